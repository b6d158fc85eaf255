"""Resuming with another model, data shape or LR schedule (issue 11, item 7): refused naming
the fields before anything is loaded; the LR schedule follows Megatron-LM's two flags."""

import shutil

import pytest

from tests.integration.conftest import TINY, launch, logged

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint


def test_resume_refuses_another_model_sequence_length_or_tokenizer(reference, cache_dir, tmp_path):
    from spiral_megatron.job.data import corpus
    from spiral_megatron.job.data.tokenizer import Tokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0] / "ckpt", ckpt)
    other = Tokenizer.train_bpe(corpus.documents()[::-7][:60], 512)  # same size, other merges
    assert other.vocab_size == 512
    shutil.rmtree(ckpt / "iter_0000004" / "tokenizer")
    other.save(ckpt / "iter_0000004" / "tokenizer")
    proc = launch(cache_dir, *TINY, "--load", ckpt, "--save", tmp_path / "new", "--seq-length", 64,
                  "--model.hidden_size", 128, expect_rc=2)
    line = proc.stderr.strip().splitlines()[-1]
    assert "the checkpoint differs from this run in model.hidden_size 64 -> 128" in line
    assert "seq_length 128 -> 64" in line and "tokenizer: the checkpoint's (512 tokens" in line


@pytest.mark.both_releases
def test_resume_with_another_lr_schedule_follows_megatron(reference, cache_dir, tmp_path):
    ckpt = reference[0] / "ckpt"
    longer = (*TINY, "--train-iters", 6, "--load", ckpt, "--save", tmp_path / "new")
    refused = launch(cache_dir, *longer, expect_rc=2)
    assert "the LR schedule differs from the checkpoint's" in refused.stderr
    assert "lr_decay_steps 16 -> 24 (lr_decay_iters/train_iters (or _samples))" in refused.stderr
    assert "--override-opt-param-scheduler" in refused.stderr
    proc = launch(cache_dir, *longer, "--override-opt-param-scheduler", "--log-json", tmp_path / "log.jsonl")
    assert "this run's values replace the checkpoint's" in proc.stdout
    assert sorted(logged(tmp_path / "log.jsonl")) == [5, 6]


def test_resume_past_train_iters_says_no_step_ran(reference, cache_dir, tmp_path):
    """A run whose --train-iters does not reach past the loaded iteration (it counts from 0, as
    Megatron-LM's) ends at once and says so, rather than 'finished' with a copy of the checkpoint."""
    proc = launch(cache_dir, *TINY, "--train-iters", 2, "--override-opt-param-scheduler",
                  "--load", reference[0] / "ckpt", "--save", tmp_path / "new")
    assert (f"finished iteration 4: no step to run, '{reference[0] / 'ckpt'}' holds iteration 4, past "
            "--train-iters 2 (it counts from iteration 0: pass more than 4 to train on)") in proc.stdout
    assert not list((tmp_path / "new").glob("iter_*"))


@pytest.mark.both_releases
def test_use_checkpoint_args_takes_the_checkpoints_model_and_refuses_a_contradiction(reference, tmp_path):
    """Megatron-LM's --use-checkpoint-args: a run whose config names another model (as a
    fine-tune of a converted model would, from the default config) builds the checkpoint's,
    compared with the record the checkpoint was saved with; a command-line field that
    contradicts it is refused, not dropped."""
    from spiral_megatron.errors import ConfigError
    from spiral_megatron.job.checkpoint import checkpoint_args
    from spiral_megatron.job.checkpoint.resume_check import architecture_differences
    from spiral_megatron.model.model_args import ModelArgs

    ckpt = reference[0] / "ckpt"
    saved = ModelArgs.load(ckpt / "iter_0000004" / "model_args.json")
    other = tmp_path / "other.yaml"
    other.write_text("model: {flavor: debug, hidden_size: 32, num_attention_heads: 2, chunk_sizes: '4,1'}\n"
                     "seq_length: 64\nrotary_base: 500\nmock_data: true\nmake_vocab_size_divisible_by: 1000\n")
    argv = ["--config", other, "--load", ckpt, "--save", tmp_path / "new", "--finetune"]
    plain = checkpoint_args.resolve(list(map(str, argv)))
    assert architecture_differences(saved, plain.model_args, weights_only=False)  # the config's model
    job = checkpoint_args.resolve(list(map(str, argv + ["--use-checkpoint-args"])))
    assert architecture_differences(saved, job.model_args, weights_only=False) == []
    assert job.model_args == saved and job.seq_length == saved.max_sequence_length == 128
    assert checkpoint_args.resolve(list(map(str, argv + ["--use-checkpoint-args", "--seq-length", 32]))).seq_length == 32
    tp2 = checkpoint_args.resolve(list(map(str, argv + ["--use-checkpoint-args", "--tensor-parallel", 2])))
    assert tp2.padded_vocab_size == saved.vocab_size == 512  # the embedding rows at another TP size
    agreeing = ["--use-checkpoint-args", "--model.chunk_sizes", "8,4,2,1", "--hidden-size", 64]
    assert checkpoint_args.resolve(list(map(str, argv + agreeing))).model_args == saved
    for extra, named in ((["--model.hidden_size", 48], "--model.hidden_size 48 (the checkpoint's: 64)"),
                         (["--rotary-base", 500], "--rotary-base 500 (the checkpoint's: 10000)")):
        with pytest.raises(ConfigError, match="contradicts " + named.replace("(", r"\(").replace(")", r"\)")):
            checkpoint_args.resolve(list(map(str, argv + ["--use-checkpoint-args", *extra])))
    # the checkpoint's tokenizer where none is given nor lies beside the data (Megatron-LM's
    # use_tokenizer_model_from_checkpoint_args), unless --no-use-tokenizer-model-from-checkpoint-args
    text = tmp_path / "text.yaml"
    text.write_text(other.read_text().replace("mock_data: true", "mock_data: false"))
    argv = ["--config", text, "--load", ckpt, "--save", tmp_path / "new", "--finetune", "--use-checkpoint-args"]
    assert checkpoint_args.resolve(list(map(str, argv))).keys.tokenizer == str(ckpt / "iter_0000004" / "tokenizer")
    assert checkpoint_args.resolve(list(map(str, argv + ["--no-use-tokenizer-model-from-checkpoint-args"]))
                                   ).keys.tokenizer is None
    with pytest.raises(ConfigError, match="holds no checkpoint to take the model from .the folder is missing"):
        checkpoint_args.resolve(["--config", str(other), "--load", str(tmp_path / "nothing"), "--use-checkpoint-args"])
