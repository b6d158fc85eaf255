"""Every FUNCTION field reaches the Hugging Face model or the conversion refuses it by name
(issue 16). Megatron's fused bias-GeLU (tanh) converts to transformers' "gelu_pytorch_tanh"."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from spiral_megatron.conversion import hf_config
from spiral_megatron.model.model_args import ModelArgs
from tests.hf import helpers as H
from tests.hf.test_parity import TOL, hf_from_megatron

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint

IDS = torch.randint(0, H.VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


def test_the_fused_gelu_is_recorded_as_tanh():
    """The job's config with bias_activation_fusion (Megatron-LM's default on GPUs) records the
    function it computes; SwiGLU's fusion is exact and records "silu"."""
    base = H.model_args().spiral_config()
    fused = dataclasses.replace(base, bias_activation_fusion=True)
    assert ModelArgs.from_config(base).config["activation_func_name"] == "gelu"
    assert ModelArgs.from_config(fused).config["activation_func_name"] == "gelu_tanh"
    swiglu = dataclasses.replace(base, activation_func=F.silu, gated_linear_unit=True, bias_activation_fusion=True)
    assert ModelArgs.from_config(swiglu).config["activation_func_name"] == "silu"


@pytest.mark.parametrize("gated", [False, True])
def test_fused_bias_gelu_converts_to_tanh_gelu(megatron, gated):
    """A "gelu_tanh" record builds the fused bias-GeLU (GeGLU when gated; it runs on CPU through
    torch.jit); the HF model is "gelu_pytorch_tanh" and gives its logits, not the erf model's."""
    args = H.model_args(gated_linear_unit=gated, activation_func_name="gelu_tanh")
    fused = H.build(args, seed=4)
    assert fused.config.bias_activation_fusion is True
    hf = hf_from_megatron(args, fused)
    assert hf.config.hidden_act == "gelu_pytorch_tanh"
    ref = H.logits(fused, IDS)[..., : H.VOCAB]
    with torch.no_grad():
        got = hf(IDS, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=TOL)
    erf = H.build(H.model_args(gated_linear_unit=gated), seed=4)  # same weights, unfused (erf)
    assert erf.config.bias_activation_fusion is False
    assert (H.logits(erf, IDS)[..., : H.VOCAB] - ref).abs().max() > 10 * TOL  # the test can tell them apart


def test_record_rebuilds_the_function(megatron, tmp_path):
    """model_args.json of a fused run rebuilds the fused run; an old file's "gelu" stays erf,
    and a runtime fusion that would change the recorded GeLU is refused."""
    args = H.model_args(activation_func_name="gelu_tanh")
    args.save(tmp_path / "new.json")
    assert ModelArgs.load(tmp_path / "new.json").spiral_config().bias_activation_fusion is True
    old = json.loads(args.to_json())
    old["config"] = {k: v for k, v in old["config"].items() if k in H.BASE}  # as written before issue 16
    old["config"]["activation_func_name"] = "gelu"
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = ModelArgs.load(tmp_path / "old.json")
    assert loaded.config["activation_func_name"] == "gelu" and loaded.spiral_config().bias_activation_fusion is False
    with pytest.raises(ValueError, match="bias_activation_fusion True would change the recorded activation 'gelu'"):
        loaded.spiral_config(bias_activation_fusion=True)


UNSUPPORTED = {  # a value the HF model does not implement, per HF_FIXED field
    "rotary_interleaved": True,
    "apply_residual_connection_post_layernorm": True,
    "layernorm_zero_centered_gamma": True,
    "qk_l2_norm": True,
    "softmax_scale": 0.5,
    "glu_linear_offset": 1.0,
    "activation_func_clamp_value": 7.0,
    "use_te_activation_func": True,
}


def test_every_fixed_field_has_a_case():
    assert set(UNSUPPORTED) == set(hf_config.HF_FIXED)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_conversion_refuses_an_unsupported_function_field_by_name(name):
    extra = dict(gated_linear_unit=True) if name in ("glu_linear_offset", "activation_func_clamp_value") else {}
    args = H.model_args(**extra, **{name: UNSUPPORTED[name]})
    with pytest.raises(hf_config.UnsupportedConfigError, match=f"{name}={UNSUPPORTED[name]!r}"):
        hf_config.to_hf_config(args)


def test_reverse_conversion_restores_the_record():
    args = H.model_args(activation_func_name="gelu_tanh", embedding_init_method_std=0.05, unrolled_output_init=False)
    back = hf_config.to_model_args(hf_config.to_hf_config(args))
    assert back.complete().config == args.complete().config
