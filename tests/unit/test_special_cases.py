"""SPEC.md section 4, special cases, against Megatron's own GPTModel as the reference.

* no loop (T = 0) == GPTModel (Megatron's stock local spec) with the same weights;
* chunk sizes all 1 with `residual` == a looped transformer: a GPTModel whose decoder is the
  prelude, the core's layers repeated T times, and the coda, all with the SAME weights.
"""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from spiral_megatron import flavors, flops
from tests.tiny import VOCAB, tiny_model

SEQ = 24


def gpt_reference(spiral, num_layers: int) -> GPTModel:
    """A plain GPTModel with the spiral model's width and `num_layers` layers."""
    c = spiral.config
    config = TransformerConfig(
        num_layers=num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        ffn_hidden_size=c.ffn_hidden_size, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=64,
                    position_embedding_type="rope")


def unrolled_state_dict(spiral, core_repeats: int) -> dict:
    """The spiral model's weights under GPTModel names, core layers repeated `core_repeats` times."""
    c, sd = spiral.config, spiral.state_dict()
    out = {k: v for k, v in sd.items() if k.startswith(("embedding.", "output_layer."))}
    order = [("prelude", i) for i in range(c.num_prelude_layers)]
    order += [("loop.core", i) for _ in range(core_repeats) for i in range(c.num_core_layers)]
    order += [("coda", i) for i in range(c.num_coda_layers)]
    for n, (part, i) in enumerate(order):
        prefix = f"{part}.layers.{i}."
        out.update({f"decoder.layers.{n}." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    out.update({k.replace("coda.final_layernorm", "decoder.final_layernorm"): v
                for k, v in sd.items() if k.startswith("coda.final_layernorm")})
    return out


def logits_of(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def load_exactly(model, state_dict):
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing


def test_no_loop_equals_megatron_gpt(megatron):
    spiral = tiny_model(num_prelude_layers=2, num_core_layers=0, num_coda_layers=1, chunk_sizes=())
    gpt = gpt_reference(spiral, num_layers=3)
    load_exactly(gpt, unrolled_state_dict(spiral, core_repeats=0))
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(logits_of(spiral, tokens), logits_of(gpt, tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("downscale,upscale", [("self-aggregation", "allocate"), ("mean", "repeat")])
def test_all_ones_residual_equals_looped_transformer(megatron, downscale, upscale):
    spiral = tiny_model(num_core_layers=2, chunk_sizes=(1, 1, 1), downscale=downscale, upscale=upscale)
    looped = gpt_reference(spiral, num_layers=1 + 2 * 3 + 1)
    load_exactly(looped, unrolled_state_dict(spiral, core_repeats=3))
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(logits_of(spiral, tokens), logits_of(looped, tokens), rtol=1e-5, atol=1e-5)


def test_all_ones_with_other_topology_is_not_looped(megatron):
    """Guards the test above: anchor with g = 1 is a different network, and it shows."""
    spiral = tiny_model(num_core_layers=2, chunk_sizes=(1, 1, 1), topology="anchor")
    looped = gpt_reference(spiral, num_layers=8)
    load_exactly(looped, unrolled_state_dict(spiral, core_repeats=3))
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    assert not torch.allclose(logits_of(spiral, tokens), logits_of(looped, tokens), atol=1e-3)


@pytest.mark.parametrize("name", ["debug", "looped-debug", "gpt-debug"])
def test_unique_parameter_count_of_debug_flavors(megatron, name):
    flavor = flavors.get(name)
    from spiral_megatron import SpiralGPTModel

    torch.manual_seed(0)
    model = SpiralGPTModel(flavor.config(use_cpu_initialization=True), flavor.vocab_size, flavor.seq_length)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == flops.unique_parameters(model.config, flavor.vocab_size)
    expected = {"debug": 266_702, "looped-debug": 265_600, "gpt-debug": 265_600}[name]
    assert counted == expected  # by hand: 4 layers x 49,984 + 2 x 512 x 64 + final norm 128 (+ 1,102 resampling)


@pytest.mark.parametrize("overrides", [
    dict(topology="mesh", mesh_slots=5), dict(downscale="mean", upscale="repeat"),
    dict(chunk_sizes=(16, 8, 4, 2, 1), topology="anchor"),
])
def test_parameter_count_matches_flops_for_every_option(megatron, overrides):
    model = tiny_model(**overrides)
    assert sum(p.numel() for p in model.parameters()) == flops.unique_parameters(model.config, VOCAB)


def test_tied_embeddings_count_once(megatron):
    from spiral_megatron import SpiralGPTModel
    from tests.tiny import tiny_config

    model = SpiralGPTModel(tiny_config(), VOCAB, 64, share_embeddings_and_output_weights=True)
    assert sum(p.numel() for p in model.parameters()) == flops.unique_parameters(model.config, VOCAB, tied_embeddings=True)
