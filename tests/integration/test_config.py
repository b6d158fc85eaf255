"""Config: YAML + command-line overrides, and every refusal names the key and the value."""

import dataclasses
from pathlib import Path

import pytest

from spiral_megatron.job.settings import checks
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
])
def test_errors_name_key_and_value(argv, message):
    with pytest.raises(ConfigError) as e:
        resolve(argv, CONFIGS / "debug-cpu.yaml")
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
