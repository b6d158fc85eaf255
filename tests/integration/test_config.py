"""Config: YAML + command-line overrides, and every refusal names the key and the value."""

import dataclasses
from pathlib import Path

import pytest

from spiral_megatron.job.settings import checks, config
from spiral_megatron.job.settings.config import ConfigError
from spiral_megatron.job.settings.resolve import resolve

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


def test_overrides_apply_with_types_over_yaml():
    cfg = resolve(["--micro-batch-size", "4", "--lr=1e-3", "--sequence-parallel", "--tensor_parallel", "2",
                   "--model.chunk_sizes", "4,2,1", "--data-path", "0.3 a 0.7 b", "--save", "null"],
                  CONFIGS / "debug-cpu.yaml").keys
    assert cfg.micro_batch_size == 4 and cfg.lr == 1e-3 and cfg.sequence_parallel is True
    assert cfg.tensor_parallel == 2 and cfg.save is None
    assert cfg.model == {"flavor": "debug", "chunk_sizes": "4,2,1"}
    assert cfg.data_path == ["0.3", "a", "0.7", "b"]
    assert cfg.train_iters == 300  # from the YAML


def test_every_shipped_config_resolves():
    for path in sorted(CONFIGS.glob("*.yaml")):
        assert resolve(["--config", str(path)]).seq_length > 0, path


@pytest.mark.parametrize("argv, message", [
    (["--micro-batchsize", "4"], "unknown config key 'micro-batchsize' (value 4)"),
    (["--train-iters", "many"], "train_iters: 'many' is not of type int"),
    (["--train-iters", "2.5"], "train_iters: 2.5 is not of type int"),
    (["--sequence-parallel", "maybe"], "sequence_parallel: 'maybe' is not of type bool"),
    (["--lr", "fast"], "lr: 'fast' is not of type float"),
    (["--micro-batch-size", "0"], "micro_batch_size 0 must be > 0"),
    (["--pipeline-parallel", "7"], "pipeline_model_parallel_size 7 is more than the 6 units of work"),
    (["--pipeline-parallel", "2", "--model.pipeline_split", "4,3"],
     "model.pipeline_split (4, 3): pipeline split (4, 3) must give each of the 2 stages at least one"),
    (["--pipeline-parallel", "2", "--model.pipeline_split", "3,x"], "pipeline_split '3,x' must be comma-separated integers"),
    (["--pipeline-parallel", "2", "--seq-length", "100"], "seq_length 100 must be a multiple of 8"),
    (["--pipeline-parallel", "2", "--model.loop_placement", "middle"], "loop_placement 'middle' must be one of"),
    (["--pipeline-parallel", "2", "--tensor-parallel", "3"], "tensor_parallel 3 does not divide model "
                                                                "num_attention_heads 4"),
    (["--sequence-parallel", "true"], "sequence_parallel true needs tensor_parallel > 1"),
    (["--min-lr", "1", "--lr", "0.1"], "min_lr 1.0 must be <= lr 0.1"),
    (["--lr-warmup-iters", "300"], "lr_warmup_iters 300 must be >= 0 and below"),
    (["--precision", "fp64"], "precision 'fp64' must be one of"),
    (["--loss-scale", "128"], "loss_scale 128.0 is only used with precision fp16"),
    (["--bf16", "--initial-loss-scale", "4096"], "initial_loss_scale 4096.0 is only used with precision fp16, "
                                                   "got precision 'bf16'"),
    (["--loss-scale-window", "10"], "loss_scale_window 10 is only used with precision fp16"),
    (["--fp16", "--loss-scale", "128", "--hysteresis", "1"],
     "hysteresis 1 sets dynamic loss scaling, but loss_scale 128.0 makes the scale static"),
    (["--fp16", "--hysteresis", "0"], "hysteresis 0 must be > 0"),
    (["--fp16", "--initial-loss-scale", "1024", "--min-loss-scale", "4096"],
     "min_loss_scale 4096.0 must be <= initial_loss_scale 1024.0"),
    (["--fp8", "e4m3"], "fp8 'e4m3' needs precision bf16 or fp16"),
    (["--fp8", "e4m3", "--precision", "bf16", "--seq-length", "64", "--micro-batch-size", "1"],
     "the core at chunk size 8 sees seq_length 64 / 8 x micro_batch_size 1 = 8 tokens per GEMM, not a multiple of 16"),
    (["--fp8", "e4m3", "--precision", "bf16", "--fp8-recipe", "sometimes"], "fp8_recipe 'sometimes' must be one of"),
    (["--mock-data", "--data-path", "x"], "mock_data true and data_path ['x'] exclude each other"),
    (["--exit-interval", "400"], "exit_interval 400 is after train_iters 300"),
    (["--model.flavor", "huge"], "model.flavor: unknown flavor 'huge'"),
    (["--model.hiden_size", "64"], "unknown model key 'model.hiden_size' (value 64)"),
    (["--model.chunk_sizes", "8,0"], "chunk size 0"),
    (["--tensor-parallel", "3"], "tensor_parallel 3 does not divide model num_attention_heads 4"),
    (["--tensor-parallel", "2", "--sequence-parallel", "--seq-length", "72"], "seq_length 72"),
    (["--config", "nowhere.yaml"], "config: file 'nowhere.yaml' does not exist"),
    (["train"], "expected --key, got 'train'"),
    (["--train-iters", "10", "20"], "train_iters: '10 20' is not of type int"),
    (["--rotary-percent", "0"], "rotary_percent 0.0 must be in (0, 1]"),
    (["--rotary-base", "0"], "rotary_base 0 must be > 0"),
    (["--eval-iters", "-1"], "eval_iters -1 must be >= 0 (0: no evaluation, as in Megatron-LM)"),
])
def test_errors_name_key_and_value(argv, message):
    with pytest.raises(ConfigError) as e:
        resolve(argv, CONFIGS / "debug-cpu.yaml")
    assert message in str(e.value)


def test_a_list_flag_takes_several_values_as_megatron_lm_does():
    """`--data-path 0.7 a 0.3 b`, Megatron-LM's blend (nargs), is the quoted `"0.7 a 0.3 b"`."""
    default = CONFIGS / "debug-cpu.yaml"
    unquoted = config.read(["--data-path", "0.7", "data/a", "0.3", "data/b", "--train-iters", "5"], default)
    quoted = config.read(["--data-path", "0.7 data/a 0.3 data/b", "--train-iters", "5"], default)
    assert unquoted.data_path == quoted.data_path == ["0.7", "data/a", "0.3", "data/b"]
    assert unquoted.train_iters == 5


def test_eval_iters_0_turns_evaluation_off_as_in_megatron_lm():
    default = CONFIGS / "debug-cpu.yaml"
    assert resolve(["--eval-iters", "0"], default).keys.eval_interval is None
    assert resolve([], default).keys.eval_interval == 100


def test_a_megatron_lm_launch_scripts_flags_are_taken_for_what_they_mean():
    """Flags a Megatron-LM launch script carries: those that set fields set them; those for what
    the job always does are taken with that value and refused with another, naming it."""
    default = CONFIGS / "debug-cpu.yaml"
    job = resolve(["--swiglu", "--disable-bias-linear", "--recompute-activations", "--overlap-grad-reduce",
                   "--use-distributed-optimizer", "--overlap-param-gather", "--accumulate-allreduce-grads-in-fp32",
                   "--untie-embeddings-and-output-weights", "--use-mcore-models", "--position-embedding-type", "rope",
                   "--ckpt-format", "torch_dist", "--tokenizer-type", "HuggingFaceTokenizer"], default)
    plain = resolve(["--use-distributed-optimizer"], default)
    m = job.model
    assert m.gated_linear_unit and m.activation_func.__name__ == "silu" and not m.add_bias_linear
    assert m.recompute_granularity == "selective" and plain.model.recompute_granularity is None
    assert job.ddp == plain.ddp and job.ddp.overlap_grad_reduce and job.ddp.overlap_param_gather
    assert job.ddp.grad_reduce_in_fp32 and job.model_args.position_embedding_type == "rope"
    assert not job.model_args.share_embeddings_and_output_weights
    for argv, message in ((["--ckpt-format", "torch"], "--ckpt-format 'torch': the job always saves Megatron-Core's "
                                                        "torch_dist checkpoints; the one value is 'torch_dist'"),
                          (["--overlap-grad-reduce=false"], "--overlap-grad-reduce False: the job always overlaps "
                                                             "the gradient reduction with the backward pass; leave it out"),
                          (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
                          (["--swiglu", "x"], "--swiglu is a flag")):
        with pytest.raises(ConfigError) as e:
            resolve(argv, default)
        assert message in str(e.value)


def test_pipeline_overrides_reach_the_model():
    spiral = resolve(["--pipeline-parallel", "2", "--model.pipeline_split", "5,1"], CONFIGS / "debug-cpu.yaml").model
    assert spiral.pipeline_split == (5, 1) and spiral.pipeline_model_parallel_size == 2
    # one-stage: prelude, the whole loop, coda = 3 units; the loop pads 100 itself.
    job = resolve(["--pipeline-parallel", "2", "--model.loop_placement", "one-stage",
                   "--model.pipeline_split", "2,1", "--seq-length", "100"], CONFIGS / "debug-cpu.yaml")
    assert job.model.loop_placement == "one-stage"
    with pytest.raises(ConfigError, match=r"pipeline split \(5, 1\) must give each of the 2 stages .* 3 units"):
        resolve(["--pipeline-parallel", "2", "--model.loop_placement", "one-stage",
                 "--model.pipeline_split", "5,1"], CONFIGS / "debug-cpu.yaml")


def test_world_size_combinations():
    cfg = resolve(["--tensor-parallel", "2", "--global-batch-size", "12", "--micro-batch-size", "4"],
                  CONFIGS / "debug-cpu.yaml").keys
    assert checks.check_world(cfg, 2) == 1
    with pytest.raises(ConfigError, match="world size 3 is not a multiple of tensor_parallel 2"):
        checks.check_world(cfg, 3)
    with pytest.raises(ConfigError, match="global_batch_size 12 is not a multiple of micro_batch_size 4 x "
                                          "data-parallel size 2"):
        checks.check_world(cfg, 4)


def test_the_resolved_job_is_immutable():
    job = resolve([], CONFIGS / "debug-cpu.yaml")
    for obj, name in ((job, "seq_length"), (job.keys, "lr"), (job.data, "seq_length"), (job.schedule, "max_lr")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 1)


def test_fp16_loss_scaling_keys_reach_megatrons_optimizer_config():
    """Megatron-LM's loss-scale flags land in the Resolved job's OptimizerConfig, which the build
    hands to Megatron's grad scaler unchanged (defaults are Megatron-LM's: 2**32, 1, 1000, 2)."""
    flags = ["--fp16", "--initial-loss-scale", "65536", "--min-loss-scale", "2", "--loss-scale-window", "7",
             "--hysteresis", "3"]
    opt = resolve(flags, CONFIGS / "debug-cpu.yaml").optimizer
    assert (opt.fp16, opt.bf16, opt.loss_scale) == (True, False, None)
    assert (opt.initial_loss_scale, opt.min_loss_scale, opt.loss_scale_window, opt.hysteresis) == (65536, 2, 7, 3)
    default = resolve(["--fp16"], CONFIGS / "debug-cpu.yaml").optimizer
    assert (default.initial_loss_scale, default.min_loss_scale, default.loss_scale_window,
            default.hysteresis) == (2.0 ** 32, 1.0, 1000, 2)
    assert resolve(["--fp16", "--loss-scale", "128"], CONFIGS / "debug-cpu.yaml").optimizer.loss_scale == 128


def test_a_blend_finds_the_tokenizer_beside_its_parts(tmp_path):
    """tools/preprocess_data.py writes <prefix>_tokenizer/ beside its data: a blend whose parts
    lie beside one tokenizer takes it (every part is then checked against it by its digest,
    job/data/dataset_check.py); beside two, it is refused naming them."""
    from spiral_megatron.job.data.tokenizer import Tokenizer

    bpe = Tokenizer.train_bpe(["the loop runs coarse to fine"] * 3, 300)
    bpe.save(tmp_path / "a_tokenizer")
    blend = ["0.7", str(tmp_path / "a"), "0.3", str(tmp_path / "b")]
    cfg = config.read(["--data-path", *blend])
    assert cfg.tokenizer == str(tmp_path / "a_tokenizer") and cfg.tokenizer_vocab_size == bpe.vocab_size
    Tokenizer.train_bpe(["another corpus, another tokenizer"] * 3, 100).save(tmp_path / "b_tokenizer")
    with pytest.raises(ConfigError, match="its parts lie beside different tokenizers"):
        config.read(["--data-path", *blend])
    assert config.read(["--data-path", *blend, "--tokenizer-model", str(tmp_path / "b_tokenizer")]).tokenizer
