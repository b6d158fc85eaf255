"""GPU-facing settings decided on any machine: FP8 refusals, Megatron-LM's fusion defaults,
the local spec's norm choice, the job's DDP configuration."""

from pathlib import Path

import pytest
import torch.nn.functional as F

from spiral_megatron.model import fusions
from spiral_megatron.job.settings.config import ConfigError
from spiral_megatron.job.settings.resolve import resolve

DEBUG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "debug-cpu.yaml"
BIG = ["--model", "spiral-1.4b", "--tokenizer-vocab-size", "50304", "--precision", "bf16", "--fp8", "e4m3"]


def test_fp8_shape_check_uses_the_padded_per_level_token_counts():
    # 4100 pads to 4104; the core at chunk size 8 sees 513 latents x 4 = 2052 tokens per GEMM.
    with pytest.raises(ConfigError, match=r"the core at chunk size 8 sees seq_length 4100 padded to 4104 / 8 "
                                          r"x micro_batch_size 4 = 2052 tokens per GEMM, not a multiple of 16"):
        resolve([*BIG, "--seq-length", "4100", "--micro-batch-size", "4"], DEBUG)
    resolve([*BIG, "--seq-length", "4096", "--micro-batch-size", "4"], DEBUG)
    with pytest.raises(ConfigError, match=r"1024 / 8 / tp 2 x micro_batch_size 1 = 64 tokens per GEMM, not a multiple of 128"):
        resolve([*BIG, "--seq-length", "1024", "--micro-batch-size", "1", "--fp8-recipe", "blockwise",
                     "--tensor-parallel", "2", "--sequence-parallel"], DEBUG)


@pytest.mark.parametrize("argv, message", [
    (["--fp8", "e5m2"], "fp8 'e5m2' must be one of ('e4m3', 'hybrid')"),
    (["--fp8-recipe", "delayed"], "fp8_recipe 'delayed' with a loop of 4 iterations"),
    (["--fp8-recipe", "nvfp4"], "fp8_recipe 'nvfp4' must be one of"),
])
def test_fp8_values_and_recipe_are_validated(argv, message):
    with pytest.raises(ConfigError) as e:
        resolve([*BIG, *argv], DEBUG)
    assert message in str(e.value)


def test_delayed_recipe_is_fine_without_a_loop():
    resolve(["--model", "gpt-1.4b", "--tokenizer-vocab-size", "50304", "--precision", "bf16",
                 "--fp8", "e4m3", "--fp8-recipe", "delayed"], DEBUG)


def test_fusions_follow_megatron_lm_on_cuda_and_say_why_when_off(monkeypatch):
    monkeypatch.setattr(fusions, "_module_exists", lambda name: False)
    monkeypatch.setattr(fusions, "_te_rope_available", lambda: True)
    on, notes = fusions.defaults(on_cuda=True, backend="transformer_engine", arch={})
    assert on["bias_activation_fusion"] and on["bias_dropout_fusion"] and on["masked_softmax_fusion"]
    assert on["apply_rope_fusion"] and not on["gradient_accumulation_fusion"]
    assert notes == ["fusion gradient_accumulation_fusion off: fused_weight_gradient_mlp_cuda (apex) is not "
                     "importable (set model.gradient_accumulation_fusion to override)"]
    on, notes = fusions.defaults(on_cuda=True, backend="local", arch={"activation_func": F.relu})
    assert not on["bias_activation_fusion"] and not on["masked_softmax_fusion"]
    assert any("activation relu has no fused bias kernel" in n for n in notes)
    on, notes = fusions.defaults(on_cuda=False, backend="local", arch={})
    assert not any(on.values()) and notes == []


def test_local_spec_keeps_apex_norm_when_megatron_chose_it():
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from spiral_megatron.model.layer_specs import _sp_aware
    from spiral_megatron.model.norm import TorchNorm

    assert _sp_aware(FusedLayerNorm) is FusedLayerNorm
    assert _sp_aware(WrappedTorchNorm) is TorchNorm


def test_ddp_overlaps_like_megatron_lm():
    plain = resolve([], DEBUG).ddp
    assert plain.overlap_grad_reduce and not plain.overlap_param_gather and plain.grad_reduce_in_fp32
    sharded = resolve(["--use-distributed-optimizer", "true"], DEBUG).ddp
    assert sharded.overlap_grad_reduce and sharded.overlap_param_gather and sharded.use_distributed_optimizer
