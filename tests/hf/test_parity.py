"""Megatron logits == HF logits for tiny configs covering every option; cached == full decode.

The HF model gets its weights through the production name table (`conversion.mapping`).
"""

import pytest
import torch

from spiral_megatron.conversion import hf_config, mapping
from spiral_megatron.conversion.convert import cached_logits
from spiral_megatron.hf.modeling_spiral import SpiralForCausalLM
from tests.hf import helpers as H

TOL = 2e-5  # float32 max abs logit difference (logits are O(1) here)
CONFIGS = {
    "spiral-default": dict(),
    "offsets-mean-repeat-anchor": dict(chunk_offsets=[3, 1, 0], downscale="mean", upscale="repeat", topology="anchor"),
    "fine-to-coarse-no-overlap-mesh-index": dict(chunk_sizes=[1, 2, 4], chunk_offsets=[0, 1, 3], shift="no-overlap",
                                                 topology="mesh", latent_positions="index"),
    "looped-gqa-glu-silu-rmsnorm": dict(chunk_sizes=[1, 1, 1], num_query_groups=2, gated_linear_unit=True,
                                        activation_func_name="silu", normalization="RMSNorm"),
    "qk-norm-no-bias-partial-rope-base": dict(chunk_sizes=[8, 4], qk_layernorm=True, add_bias_linear=False,
                                              _args=dict(rotary_percent=0.5, rotary_base=500000)),
    "no-prelude-no-coda-mesh3-odd-lcm": dict(num_prelude_layers=0, num_coda_layers=0, chunk_sizes=[2, 3],
                                             chunk_offsets=[1, 2], topology="mesh", mesh_slots=3,
                                             add_qkv_bias=True, add_bias_linear=False),
    "gpt-tied-no-rope": dict(num_prelude_layers=2, num_core_layers=0, chunk_sizes=[], _args=dict(tied=True, rope="none")),
}


def hf_from_megatron(args, model) -> SpiralForCausalLM:
    config = hf_config.to_hf_config(args, vocab_size=H.VOCAB)
    source = mapping.normalize_megatron(model.state_dict())
    state = mapping.megatron_to_hf(source, hf_config.shapes_of(config), config.tie_word_embeddings)
    hf = SpiralForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    return hf


@pytest.mark.parametrize("name", list(CONFIGS))
def test_megatron_equals_hf_and_cached_equals_full(megatron, name):
    config = dict(CONFIGS[name])
    args = H.model_args(**config.pop("_args", {}), **config)
    model = H.build(args, seed=1)
    hf = hf_from_megatron(args, model)
    ids = torch.randint(0, H.VOCAB, (2, 23), generator=torch.Generator().manual_seed(2))  # 23: end padding
    ref = H.logits(model, ids)[..., : H.VOCAB]
    with torch.no_grad():
        full = hf(ids, use_cache=False).logits
        cached = cached_logits(hf, ids, prefill=5)
    diff, cdiff = (full - ref).abs().max().item(), (cached - full).abs().max().item()
    print(f"\n{name}: max |megatron - hf| = {diff:.2e}, max |cached - full| = {cdiff:.2e}, |logits| <= {ref.abs().max():.2f}")
    assert ref.abs().max() > 0.5  # weights large enough for a meaningful comparison
    torch.testing.assert_close(full, ref, rtol=0, atol=TOL)
    torch.testing.assert_close(cached, full, rtol=0, atol=TOL)


def test_te_names_and_stacked_layers_normalize_to_local(megatron):
    args = H.model_args(num_query_groups=2)
    local = {k: v for k, v in H.build(args).state_dict().items() if isinstance(v, torch.Tensor)}
    te = {}
    for k, v in local.items():  # rename to Transformer Engine's fused-norm names, stack the core
        for te_name, local_name in mapping.TE_NAMES.items():
            k = k.replace(local_name, te_name) if k.endswith(local_name) else k
        te[k] = v
    stacked = {k: v for k, v in te.items() if not k.startswith("loop.core.layers.")}
    for k in [k for k in te if k.startswith("loop.core.layers.0.")]:
        name = k[len("loop.core.layers.0."):]
        stacked[f"loop.core.layers.{name}"] = torch.stack([te[f"loop.core.layers.{i}.{name}"] for i in range(2)])
    want = {k: v for k, v in local.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    got = mapping.normalize_megatron(stacked)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_unmapped_tensor_is_refused():
    shapes = mapping.Shapes(4, 4, 8, False, 50, 64)
    with pytest.raises(KeyError, match="no row in the name table"):
        mapping.megatron_to_hf({"prelude.layers.0.mystery.weight": torch.zeros(2)}, shapes, tied=False)
    with pytest.raises(KeyError, match="no row in the name table"):
        mapping.hf_to_megatron({"model.mystery": torch.zeros(2)}, shapes, tied=False)


def test_qkv_split_is_per_query_group():
    s = mapping.Shapes(num_attention_heads=4, num_query_groups=2, head_dim=1, gated_linear_unit=False,
                       vocab_size=1, megatron_vocab_size=1)
    fused = torch.tensor([0.0, 1, 10, 20, 2, 3, 11, 21])[:, None]  # group 0: q0 q1 k0 v0 | group 1: q2 q3 k1 v1
    q, k, v = mapping.split_qkv(fused, s)
    assert q.flatten().tolist() == [0, 1, 2, 3] and k.flatten().tolist() == [10, 11] and v.flatten().tolist() == [20, 21]
    assert torch.equal(mapping.merge_qkv([q, k, v], s), fused)
