"""The command line as a Megatron-LM user types it: --help, Megatron-LM's names, typo hints,
one-line errors for broken YAML and values."""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from spiral_megatron.job.settings import cli
from spiral_megatron.job.settings.config import ConfigError, TrainingConfig
from spiral_megatron.job.settings.resolve import resolve
from tests.integration.conftest import ROOT, SCRIPT

DEFAULT = ROOT / "examples" / "configs" / "debug-cpu.yaml"


def test_help_lists_every_key_once_with_type_default_and_help():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    grouped = [k for _, keys in cli.GROUPS for k in keys]
    names = [f.name for f in dataclasses.fields(TrainingConfig)]
    assert sorted(grouped) == sorted(names)  # every key in exactly one section
    docs = cli.field_docs(TrainingConfig)
    for name in names:
        flag = f"--{name.replace('_', '-')} "
        assert flag in proc.stdout, name
        assert docs[name] and docs[name] in proc.stdout, name
    for title, _ in cli.GROUPS:
        assert f"\n{title}:\n" in proc.stdout
    assert "--tensor-parallel int [default: 1] (also --tensor-model-parallel-size)" in proc.stdout
    assert "model.chunk_sizes [function]:" in proc.stdout and "model.loop_placement [runtime]:" in proc.stdout
    assert "function fields of TransformerConfig: activation_func," in proc.stdout  # each field's class


@pytest.mark.parametrize("argv, field, value", [
    (["--tensor-model-parallel-size", "2"], "tensor_parallel", 2),
    (["--pipeline-model-parallel-size", "2"], "pipeline_parallel", 2),
    (["--micro-batch-size", "4", "--global-batch-size", "8"], "micro_batch_size", 4),
    (["--seq-length", "64"], "seq_length", 64),
    (["--lr", "1e-3", "--min-lr", "1e-4"], "min_lr", 1e-4),
    (["--lr-decay-style", "linear"], "lr_decay_style", "linear"),
    (["--lr-warmup-iters", "5"], "lr_warmup_iters", 5),
    (["--bf16"], "precision", "bf16"),
    (["--fp16"], "precision", "fp16"),
    (["--use-distributed-optimizer"], "use_distributed_optimizer", True),
    (["--tensorboard-dir", "tb"], "tensorboard_dir", "tb"),
    (["--save", "x", "--load", "x"], "load", "x"),
    (["--distributed-backend", "gloo"], "backend", "gloo"),
    (["--data-cache-path", "/tmp/c"], "cache_dir", "/tmp/c"),
])
def test_megatron_lm_names(argv, field, value):
    assert getattr(resolve(argv, DEFAULT).keys, field) == value


def test_megatron_lm_launch_script_flags_for_what_the_job_does():
    """A Megatron-LM GPT script's flags that mean what the job does anyway are taken;
    --group-query-attention applies --num-query-groups."""
    job = resolve(["--group-query-attention", "--num-query-groups", "2", "--use-rotary-position-embeddings",
                   "--no-position-embedding", "--dataloader-type", "single", "--log-throughput",
                   "--no-create-attention-mask-in-dataloader", "--weight-decay-incr-style", "constant"], DEFAULT)
    assert job.model.num_query_groups == 2 and job.model.num_attention_heads == 4


def test_the_configs_load_what_they_save_and_follow_another_save():
    """examples/configs/*.yaml resume themselves (load = save): the same command resumes, and a
    command-line --save moves the load along (not the file's folder); an explicit --load wins."""
    assert resolve([], DEFAULT).keys.load == resolve([], DEFAULT).keys.save == "checkpoints/debug"
    assert resolve(["--save", "ckpt/mine"], DEFAULT).keys.load == "ckpt/mine"
    assert resolve(["--save", "ckpt/mine", "--load", "ckpt/other"], DEFAULT).keys.load == "ckpt/other"
    assert resolve(["--save", "null"], DEFAULT).keys.load is None


def test_model_fields_at_the_top_level():
    cfg = resolve(["--hidden-size", "128", "--num-attention-heads", "8", "--no-masked-softmax-fusion",
                   "--no-bias-gelu-fusion"], DEFAULT).keys
    assert cfg.model["hidden_size"] == 128 and cfg.model["num_attention_heads"] == 8
    assert cfg.model["masked_softmax_fusion"] is False and cfg.model["bias_activation_fusion"] is False


@pytest.mark.parametrize("argv, key, value", [
    (["--norm-epsilon", "1e-6"], "model.layernorm_epsilon", 1e-6),
    (["--apply-layernorm-1p"], "model.layernorm_zero_centered_gamma", True),
    (["--no-bias-swiglu-fusion"], "model.bias_activation_fusion", False),
    (["--fp8-param-gather"], "model.fp8_param", True),
    (["--no-mmap-bin-files"], "mmap_bin_files", False),
    (["--manual-gc", "--no-manual-gc-eval"], "manual_gc_eval", False),
    (["--manual-gc", "--manual-gc-interval", "5"], "manual_gc_interval", 5),
    (["--eod-mask-loss"], "eod_mask_loss", True),
    (["--lr-warmup-init", "1e-4"], "lr_warmup_init", 1e-4),
    (["--empty-unused-memory-level", "1"], "empty_unused_memory_level", 1),
    (["--log-params-norm", "--log-num-zeros-in-grad"], "log_num_zeros_in_grad", True),
    (["--exit-on-missing-checkpoint"], "exit_on_missing_checkpoint", True),
])
def test_more_megatron_lm_flags(argv, key, value):
    """Flags of Megatron-LM's launch scripts, read into the key they mean (model fields unchecked
    here: some need a GPU's Transformer Engine)."""
    from spiral_megatron.job.settings import config

    parsed = config.read(argv, DEFAULT)
    got = parsed.model.get(key[6:]) if key.startswith("model.") else getattr(parsed, key)
    assert got == value


# Every flag of Megatron-LM's GPT-3 175B and Llama 3 8B FP8 pretraining scripts
# (examples/gpt3/train_gpt3_175b_distributed.sh, examples/llama/train_llama3_8b_h100_fp8.sh),
# with a value where it takes one.
MEGATRON_LM_SCRIPT_FLAGS = [
    "--num-layers 96", "--hidden-size 128", "--num-attention-heads 4", "--seq-length 128",
    "--max-position-embeddings 2048", "--attention-backend auto", "--micro-batch-size 1", "--global-batch-size 16",
    "--step-batch-size-schedule 0:16", "--train-iters 20", "--weight-decay 0.1", "--adam-beta1 0.9",
    "--adam-beta2 0.95", "--init-method-std 0.006", "--clip-grad 1.0", "--fp16", "--lr 6.0e-5",
    "--lr-decay-style cosine", "--min-lr 6.0e-6", "--lr-warmup-fraction .001", "--lr-decay-iters 20",
    "--tensor-model-parallel-size 1", "--pipeline-model-parallel-size 1", "--data-path x", "--vocab-file v",
    "--merge-file m", "--split 949,50,1", "--log-interval 100", "--save-interval 10000", "--eval-interval 1000",
    "--save x", "--load x", "--eval-iters 10", "--tensorboard-dir tb",
    "--use-mcore-models", "--ffn-hidden-size 256", "--group-query-attention", "--num-query-groups 2",
    "--kv-channels 32", "--position-embedding-type rope", "--rotary-base 1000000", "--rotary-percent 1.0",
    "--attention-dropout 0.0", "--hidden-dropout 0.0", "--swiglu", "--normalization RMSNorm",
    "--apply-layernorm-1p", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--train-samples 1600", "--lr-decay-samples 1600", "--lr-warmup-samples 16", "--decoupled-lr 5.0e-4",
    "--decoupled-min-lr 4.5e-5", "--bf16", "--grad-reduce-in-bf16", "--cross-entropy-loss-fusion",
    "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level 1", "--exit-duration-in-mins 235",
    "--fp8-format hybrid", "--fp8-amax-history-len 1024", "--fp8-amax-compute-algo max", "--fp8-param-gather",
    "--context-parallel-size 1", "--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce",
    "--overlap-param-gather", "--mock-data", "--tokenizer-type HuggingFaceTokenizer", "--data-cache-path c",
    "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files", "--num-workers 1",
    "--tokenizer-model t", "--vocab-size 128256", "--log-throughput", "--profile", "--profile-step-start 4", "--profile-step-end 6",
    "--ckpt-format torch_dist", "--distributed-timeout-minutes 60",
    "--use-dist-ckpt",  # deprecated in Megatron-LM (no effect there), still in older launch scripts
]


@pytest.mark.parametrize("flag", MEGATRON_LM_SCRIPT_FLAGS)
def test_every_flag_of_megatron_lms_gpt_scripts_is_known(flag):
    """Each is taken, or refused in one line that says what the job does or what to pass: none is
    an unknown key (a launch script carried over gets an answer for every line)."""
    from spiral_megatron.job.settings import config

    raw, *value = flag[2:].split(" ", 1)
    try:
        pairs = cli.canonical(raw, value[0] if value else True, config.FIELDS)
    except ConfigError as e:
        assert "\n" not in str(e) and "unknown" not in str(e)
        return
    assert pairs, f"{flag} is unknown"


def test_skip_train_names_the_tool_that_evaluates_a_checkpoint():
    """Megatron-LM's --skip-train (evaluate, no training): refused in one line naming
    tools/evaluate.py; it was "unknown config key"."""
    from spiral_megatron.job.settings import config

    with pytest.raises(ConfigError, match=r"^--skip-train True: an evaluation-only run is not built: tools/evaluate.py "
                                          r"--model CHECKPOINT --data PREFIX"):
        cli.canonical("skip-train", True, config.FIELDS)


def test_lr_warmup_init_starts_the_warmup():
    """--lr-warmup-init (Megatron-LM's): Megatron's scheduler rises linearly from it to lr."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    job = resolve(["--lr-warmup-init", "1e-4", "--lr-warmup-iters", "4", "--lr", "1e-3", "--lr-decay-style",
                   "constant", "--min-lr", "1e-3"], DEFAULT)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = OptimizerParamScheduler(optimizer, **dataclasses.asdict(job.schedule))
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(5):
        scheduler.step(increment=16)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-4 + 0.9e-3 * k / 4 for k in range(5)] + [1e-3], rel=1e-12)


def test_a_lr_warmup_iters_on_the_command_line_replaces_the_yamls_fraction():
    cfg = resolve(["--lr-warmup-iters", "3"], DEFAULT).keys
    assert (cfg.lr_warmup_iters, cfg.lr_warmup_fraction) == (3, None)
    assert resolve(["--train-iters", "20"], DEFAULT).keys.lr_warmup_fraction == pytest.approx(0.0667)


def test_sample_based_training_as_megatron_lm(tmp_path):
    """--train-samples N trains N // global batch steps (the YAML's train_iters gives way), and the
    LR schedule counts samples: Megatron's scheduler stepped by the global batch follows the
    cosine formula over lr_decay_samples, here not a whole number of steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    job = resolve(["--train-samples", "100", "--lr-warmup-samples", "20", "--lr-decay-samples", "90",
                   "--lr", "1e-3", "--min-lr", "1e-4"], DEFAULT)
    assert (job.keys.train_iters, job.data.train_samples) == (6, 100)  # 96 samples trained, 100 drawn
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = OptimizerParamScheduler(optimizer, **dataclasses.asdict(job.schedule))
    lrs = []
    for _ in range(job.keys.train_iters):
        scheduler.step(increment=16)
        lrs.append(optimizer.param_groups[0]["lr"])
    want = [1e-3 * 16 / 20] + [1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * min(n - 20, 70) / 70))
                               for n in range(32, 97, 16)]
    assert lrs == pytest.approx(want, rel=1e-12)
    recorded = tmp_path / "config.yaml"  # a checkpoint's record holds both train_iters and train_samples
    recorded.write_text(job.keys.to_yaml())
    assert resolve(["--config", str(recorded)]).keys == job.keys


@pytest.mark.parametrize("argv, message", [
    (["--micro-bach-size", "4"], "unknown config key 'micro-bach-size' (value 4); did you mean --micro-batch-size?"),
    (["--model.chunk_size", "4"], "did you mean --model.chunk-sizes?"),
    (["--bf16", "false"], "--bf16 is a flag (it means bf16); got value False"),
    (["--split", "abc"], "split 'abc' must be up to 3 non-negative numbers"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"], "lr_warmup_fraction 0.1 and lr_warmup_iters 3 exclude each other"),
    (["--data-path", "a", "--valid-data-path", "b"], "data_path ['a'] and train_data_path/valid_data_path exclude each other"),
    (["--num-layers", "24"], "--num-layers 24: depth is --model.num_prelude_layers + --model.num_core_layers x "
     "len(chunk_sizes) + --model.num_coda_layers"),
    (["--max-position-embeddings", "128"], "--max-position-embeddings 128: the model has rotary positions only"),
    (["--group-query-attention"], "--group-query-attention needs --num-query-groups (Megatron-LM would take 1: "
     "multi-query attention)"),
    (["--dataloader-type", "cyclic"], "--dataloader-type 'cyclic': the job always reads samples in order"),
    (["--train-samples", "800", "--train-iters", "20"], "train_iters 20 and train_samples 800 exclude each other (as in "
     "Megatron-LM; train_samples takes train_samples // global_batch_size = 50 steps)"),
    (["--train-samples", "8"], "train_samples 8 must be at least global_batch_size 16 (one step)"),
    (["--train-samples", "800", "--lr-decay-iters", "40"], "lr_decay_iters 40 counts iterations, but train_samples "
     "makes the run sample-based: give lr_decay_samples"),
    (["--lr-warmup-samples", "64"], "lr_warmup_samples 64 counts samples, but the run counts iterations: give "
     "lr_warmup_iters, or train_samples for a sample-based run"),
    (["--train-samples", "800", "--lr-warmup-samples", "64", "--lr-warmup-fraction", "0.1"],
     "lr_warmup_fraction 0.1 and lr_warmup_samples 64 exclude each other"),
    (["--train-samples", "800", "--lr-warmup-samples", "700", "--lr-decay-samples", "640"],
     "lr_warmup_samples 700 must be >= 0 and below lr_decay_samples (or train_samples) 640"),
    (["--wandb-project", "p"], "--wandb-project 'p': Weights & Biases logging is not built: the job logs to "
     "--tensorboard-dir and --log-json"),
    (["--use-flash-attn"], "--use-flash-attn True: the attention kernel is --attention-backend's"),
    (["--distributed-timeout-minutes", "0"], "distributed_timeout_minutes 0 must be > 0"),
    (["--lr-warmup-init", "0.5"], "lr_warmup_init 0.5 must be in [0, lr 0.003]"),
    (["--manual-gc-interval", "5"], "manual_gc_interval and manual_gc_eval mean something with manual_gc only"),
    (["--empty-unused-memory-level", "3"], "empty_unused_memory_level 3 must be 0, 1 or 2"),
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 True: the job reduces gradients in fp32"),
    (["--reset-position-ids"], "--reset-position-ids True: a sample's documents are not separated"),
    (["--no-save-optim"], "--no-save-optim True: every checkpoint holds what resuming needs"),
    (["--optimizer", "sgd"], "--optimizer 'sgd': the job always uses Megatron's Adam"),
    (["--test-data-path", "t"], "--test-data-path 't': the test split is never read"),
    (["--num-experts", "8"], "--num-experts 8: mixture-of-experts layers are not built"),
    (["--yaml-cfg", "a.yaml"], "--yaml-cfg 'a.yaml': the job's YAML is --config FILE.yaml"),
    (["--use-dist-ckpt", "false"], "--use-dist-ckpt False: the job always saves Megatron-Core's torch_dist"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 both set precision ('bf16', 'fp16'): pass one"),
    (["--tensor-parallel", "1", "--tensor-model-parallel-size", "2"],
     "--tensor-parallel and --tensor-model-parallel-size both set tensor_parallel (1, 2): pass one"),
    (["--swiglu", "--model.activation_func", "gelu"],
     "--swiglu and --model.activation_func both set model.activation_func ('silu', 'gelu')"),
])
def test_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        resolve(argv, DEFAULT)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_broken_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  flavor: debug\n lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' line \d+ column \d+: not valid YAML"):
        resolve(["--config", str(bad)])
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"bin.yaml' is not a text file"):
        resolve(["--config", str(binary)])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of keys, got list"):
        resolve(["--config", str(listy)])


def test_torchrun_shows_the_one_line_as_root_cause(cache_dir, tmp_path):
    from tests.integration.conftest import launch

    proc = launch(cache_dir, "--pipeline-model-parallel-size", 4, "--save", tmp_path / "c", nproc=2,
                  expect_rc=1, timeout=180)
    line = ("pretrain_spiral: error: tensor_parallel 1 x pipeline_parallel 4 needs at least 4 processes; "
            "2 were started")
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert line in root_cause and "traceback : pretrain_spiral: error:" in root_cause


def test_a_micro_batch_far_beyond_memory_is_refused_before_the_first_step(cache_dir, tmp_path):
    from tests.integration.conftest import launch

    proc = launch(cache_dir, "--micro-batch-size", 100000, "--global-batch-size", 100000, "--seq-length", 512,
                  "--save", tmp_path / "c", expect_rc=2, timeout=180)
    assert "pretrain_spiral: error: micro_batch_size 100000 x seq_length 512 needs at least" in proc.stderr
    assert "GiB per process" in proc.stderr and "| loss" not in proc.stdout
