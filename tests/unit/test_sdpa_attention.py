"""SDPAttention (torch's scaled_dot_product_attention) against Megatron's unfused
DotProductAttention in fp32: the same outputs and gradients for every option mix, masks it
cannot express refused, O(s) activations kept for backward; and how `attention_backend`
chooses it (issue 15). TP2 (+ SP) is tests/distributed/test_tensor_parallel.py."""

import os

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType

from spiral_megatron.model.activation_memory import saved_for_backward
from spiral_megatron.model.layer_specs import core_attention_for, get_spiral_model_spec
from spiral_megatron.model.loop import causal_mask
from spiral_megatron.model.sdpa_attention import SDPAttention, is_causal_mask
from tests.tiny import VOCAB, tiny_config, tiny_model

NVTE = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
SEQ, BATCH = 32, 2


@pytest.fixture
def fresh_env(monkeypatch):
    """Megatron's LanguageModule pins NVTE_*_ATTN to the first model's attention_backend and
    asserts that later models agree; each build here starts clean, the suite gets its env back."""
    for name in NVTE:
        monkeypatch.setenv(name, "")  # recorded, restored after the test

    def clear():
        for name in NVTE:
            os.environ.pop(name, None)
    return clear


def core_pair(config, layer_number=3, mask_type=AttnMaskType.causal):
    """(Megatron's DotProductAttention, SDPAttention) of one layer of `config`."""
    args = dict(config=config, layer_number=layer_number, attn_mask_type=mask_type, attention_type="self")
    return DotProductAttention(**args), SDPAttention(**args)


def qkv(config, sq=SEQ, seed=0):
    """query [sq, b, np, hn], key and value [sq, b, ng, hn], leaves that take gradients."""
    g = torch.Generator().manual_seed(seed)
    hn, heads, groups = config.kv_channels, config.num_attention_heads, config.num_query_groups
    shapes = [(sq, BATCH, heads, hn), (sq, BATCH, groups, hn), (sq, BATCH, groups, hn)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def forward_backward(core, tensors, mask):
    """(context [sq, b, hp], grads of q, k, v) of one call."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = core(*leaves, mask)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return out.detach(), [t.grad for t in leaves]


MIXES = {
    "plain": {},
    "gqa-2-groups": dict(num_query_groups=2),
    "mqa": dict(num_query_groups=1),
    "qk-layer-scaling": dict(apply_query_key_layer_scaling=True),
    "softmax-scale": dict(softmax_scale=0.3),
    "gqa+scaling+scale": dict(num_query_groups=2, apply_query_key_layer_scaling=True, softmax_scale=0.7),
}


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("mask", ["causal-default", "explicit-causal"])
def test_core_attention_equals_megatron_unfused(megatron, mix, mask):
    config = tiny_config(**MIXES[mix])
    unfused, sdpa = core_pair(config)
    tensors = qkv(config)
    explicit = causal_mask(SEQ, "cpu") if mask == "explicit-causal" else None  # [1, 1, s, s]
    ref, ref_grads = forward_backward(unfused, tensors, explicit)
    out, grads = forward_backward(sdpa, tensors, explicit)
    assert out.shape == (SEQ, BATCH, config.num_attention_heads * config.kv_channels)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")


def test_padding_layer_without_mask_is_full_attention_as_in_megatron(megatron):
    config = tiny_config()
    unfused, sdpa = core_pair(config, mask_type=AttnMaskType.padding)
    tensors = qkv(config)
    torch.testing.assert_close(forward_backward(sdpa, tensors, None)[0], forward_backward(unfused, tensors, None)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask, message", [
    (causal_mask(SEQ, "cpu").transpose(-1, -2), "takes only the causal mask"),  # anti-causal
    (torch.zeros(1, 1, SEQ, SEQ, dtype=torch.bool), "takes only the causal mask"),  # a padding mask
    (causal_mask(SEQ, "cpu").float(), "torch.float32 mask of shape (1, 1, 32, 32)"),
])
def test_masks_it_cannot_express_are_refused(megatron, mask, message):
    _, sdpa = core_pair(tiny_config())
    with pytest.raises(ValueError, match="unfused") as e:
        sdpa(*qkv(tiny_config()), mask)
    assert message in str(e.value)


def test_other_inputs_are_refused(megatron):
    config = tiny_config()
    _, sdpa = core_pair(config)
    with pytest.raises(ValueError, match="attention_bias is not supported"):
        sdpa(*qkv(config), None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="packed sequences are not supported"):
        sdpa(*qkv(config), None, packed_seq_params=object())
    q, k, v = qkv(config)
    with pytest.raises(ValueError, match="needs sq == sk, got sq 16, sk 32"):
        sdpa(q[:16], k, v, None)
    with pytest.raises(ValueError, match="attn_mask_type arbitrary is not supported"):
        core_pair(config, mask_type=AttnMaskType.arbitrary)[1](*qkv(config), None)
    with pytest.raises(ValueError, match="softmax_type 'off-by-one' is not supported"):
        core_pair(tiny_config(softmax_type="off-by-one"))


def test_is_causal_mask_reads_megatron_masks():
    assert is_causal_mask(causal_mask(8, "cpu").expand(3, 1, 8, 8), 8, 8)
    assert not is_causal_mask(causal_mask(8, "cpu"), 8, 4)
    assert not is_causal_mask(causal_mask(8, "cpu")[0], 8, 8)


def model_step(backend, tokens, mask=None, **overrides):
    """(loss, {name: grad}) of one step of the tiny model on `tokens` [b, s + 1]."""
    model = tiny_model(seed=0, attention_backend=backend, **overrides)
    assert isinstance(model.loop.core.layers[0].self_attention.core_attention,
                      SDPAttention if backend == AttnBackend.flash else DotProductAttention)
    s = tokens.shape[1] - 1
    torch.manual_seed(5)  # dropout, where on
    loss = model(tokens[:, :-1], torch.arange(s).expand(tokens.shape[0], s), mask, labels=tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


MODEL_MIXES = {
    "mesh": {},
    "anchor-gqa-qk-norm": dict(topology="anchor", num_query_groups=2, qk_layernorm=True),
    "residual-qk-layer-scaling": dict(topology="residual", apply_query_key_layer_scaling=True),
    "recompute-core-attention": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
}


@pytest.mark.parametrize("mix", sorted(MODEL_MIXES))
@pytest.mark.parametrize("explicit_mask", [False, True], ids=["causal-default", "explicit-mask"])
def test_model_with_sdpa_equals_model_with_megatron_attention(megatron, fresh_env, mix, explicit_mask):
    """The whole model (prelude, the loop's core at every chunk size, coda); with a mask passed
    to the model the loop hands its core explicit causal masks (use_mask)."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    mask = causal_mask(SEQ, "cpu") if explicit_mask else None
    fresh_env()
    ref_loss, ref_grads = model_step(AttnBackend.unfused, tokens, mask, **MODEL_MIXES[mix])
    fresh_env()
    loss, grads = model_step(AttnBackend.flash, tokens, mask, **MODEL_MIXES[mix])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_dropout_draws_from_the_seeded_rng_and_only_in_training(megatron):
    """On CPU torch's SDPA with dropout takes its math path, which draws the same mask as
    Megatron's nn.Dropout from the same generator: the outputs agree exactly, train and eval."""
    config = tiny_config(attention_dropout=0.5)
    unfused, sdpa = core_pair(config)
    tensors = qkv(config)
    runs = {}
    for name, core in (("unfused", unfused), ("sdpa", sdpa)):
        for seed in (5, 5, 6):
            torch.manual_seed(seed)
            runs[name, seed] = forward_backward(core.train(), tensors, None)
        runs[name, "eval"] = forward_backward(core.eval(), tensors, None)
    for key in (5, 6, "eval"):
        torch.testing.assert_close(runs["sdpa", key][0], runs["unfused", key][0], rtol=1e-5, atol=1e-6)
        for g, r in zip(runs["sdpa", key][1], runs["unfused", key][1]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    dropped = runs["sdpa", 5][0]
    assert (dropped - runs["sdpa", "eval"][0]).norm() > 0.5 * dropped.norm(), "dropout 0.5 changed little"
    assert not torch.equal(dropped, runs["sdpa", 6][0]), "another seed gave the same dropout mask"


def test_recompute_replays_the_attention_dropout(megatron, fresh_env):
    """Megatron's recompute of the core attention restores the RNG: the same gradients."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    fresh_env()
    loss, grads = model_step(AttnBackend.flash, tokens, attention_dropout=0.3)
    fresh_env()
    loss_r, grads_r = model_step(AttnBackend.flash, tokens, attention_dropout=0.3, recompute_granularity="selective",
                                 recompute_modules=["core_attn"])
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    for n, g in grads.items():
        torch.testing.assert_close(grads_r[n], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def kept_bytes(backend, seq: int) -> int:
    """Bytes of activations the tiny model (fp32, batch 2) keeps for backward at `seq`."""
    model = tiny_model(seed=0, attention_backend=backend)
    tokens = torch.randint(0, VOCAB, (BATCH, seq + 1), generator=torch.Generator().manual_seed(1))
    with saved_for_backward(model) as kept:
        model(tokens[:, :-1], torch.arange(seq).expand(BATCH, seq), None, labels=tokens[:, 1:]).mean()
    return sum(kept.values())


def test_sdpa_keeps_activations_linear_in_sequence_length(megatron, fresh_env):
    """Megatron's unfused attention keeps the [b, np, s, s] probabilities of every layer; SDPA
    keeps O(s) (its CPU flash kernel without dropout; flash / cuDNN / efficient on CUDA)."""
    kept = {}
    for backend in (AttnBackend.unfused, AttnBackend.flash):
        for seq in (128, 512):
            fresh_env()
            kept[backend.name, seq] = kept_bytes(backend, seq)
    print({k: f"{v / 2**20:.2f} MiB" for k, v in kept.items()})
    assert kept["flash", 512] <= 4 * kept["flash", 128] * 1.01, "SDPA's kept activations grow faster than s"
    assert kept["unfused", 512] > 6 * kept["unfused", 128], "the counter does not see unfused's s^2 terms"
    assert kept["flash", 512] < kept["unfused", 512] / 3


@pytest.mark.parametrize("backend, setting, on_cuda, expected", [
    ("local", AttnBackend.auto, False, None),  # the CPU suite keeps Megatron's attention
    ("local", AttnBackend.auto, True, SDPAttention),
    ("local", AttnBackend.flash, False, SDPAttention),
    ("local", AttnBackend.fused, True, SDPAttention),
    ("local", AttnBackend.unfused, True, None),
    ("local", AttnBackend.local, True, None),
    ("transformer_engine", AttnBackend.auto, True, None),
    ("transformer_engine", AttnBackend.flash, True, None),
    ("transformer_engine", AttnBackend.local, True, DotProductAttention),
])
def test_attention_backend_chooses_the_core_attention(backend, setting, on_cuda, expected):
    assert core_attention_for(backend, setting, on_cuda) is expected


def test_spec_follows_the_config_on_cpu():
    def core(config):
        return get_spiral_model_spec(config).loop.layer.submodules.self_attention.submodules.core_attention

    assert core(tiny_config()) is DotProductAttention  # auto on CPU
    assert core(tiny_config(attention_backend=AttnBackend.flash)) is SDPAttention


def test_fusions_name_the_attention_where_sdpa_replaces_megatrons_softmax(monkeypatch):
    from spiral_megatron.model import fusions

    monkeypatch.setattr(fusions, "_module_exists", lambda name: True)  # every kernel importable
    monkeypatch.setattr(fusions, "_te_rope_available", lambda: True)
    monkeypatch.setattr(fusions, "_apex_norm", lambda: True)
    on, notes = fusions.defaults(on_cuda=True, backend="local", arch={})
    assert not on["masked_softmax_fusion"] and notes == [
        "fusion masked_softmax_fusion off: not used: the core attention is torch's scaled_dot_product_attention "
        "(attention_backend auto; 'unfused' keeps Megatron's) (set model.masked_softmax_fusion to override)"]
    on, notes = fusions.defaults(on_cuda=True, backend="local", arch={"attention_backend": AttnBackend.unfused})
    assert on["masked_softmax_fusion"] and notes == []
    on, notes = fusions.defaults(on_cuda=True, backend="transformer_engine", arch={})
    assert on["masked_softmax_fusion"]
    monkeypatch.setattr(fusions, "_module_exists", lambda name: False)  # TE, but Megatron's attention
    on, notes = fusions.defaults(on_cuda=True, backend="transformer_engine", arch={"attention_backend": AttnBackend.local})
    assert not on["masked_softmax_fusion"] and any(
        "attention_backend local runs Megatron's attention in the TE layers, and Megatron's fused softmax" in n
        for n in notes)
