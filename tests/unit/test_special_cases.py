"""docs/MODEL.md section 4, special cases, against Megatron's own GPTModel as the reference.

* no loop (T = 0) == GPTModel (Megatron's stock local spec) with the same weights;
* chunk sizes all 1 with `residual` == a looped transformer: a GPTModel whose decoder is the
  prelude, the core's layers repeated T times, and the coda, all with the SAME weights;
* chunk sizes all 1 with `mesh` == MeSH as its paper writes it, computed here by hand.
GPTModel does not scale its embeddings: it gets the spiral model's scaled embeddings as its
`decoder_input` (with `scale_embeddings` on) or its own embedding output (off).
"""

import math

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from spiral_megatron.config import flavors, flops
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


def logits_of(model, tokens, embedding_scale: float = 1.0):
    """Logits [b, s, V]; for a GPTModel, embeddings times `embedding_scale` as decoder_input."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        if isinstance(model, GPTModel):
            scaled = model.embedding(input_ids=tokens, position_ids=positions) * embedding_scale  # [s, b, h]
            return model(tokens, positions, None, decoder_input=scaled)
        return model(tokens, positions, None)


def load_exactly(model, state_dict):
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing


@pytest.mark.parametrize("scale", [True, False], ids=["scaled-embeddings", "unscaled"])
def test_no_loop_equals_megatron_gpt(megatron, scale):
    spiral = tiny_model(num_prelude_layers=2, num_core_layers=0, num_coda_layers=1, chunk_sizes=(),
                        scale_embeddings=scale)
    gpt = gpt_reference(spiral, num_layers=3)
    load_exactly(gpt, unrolled_state_dict(spiral, core_repeats=0))
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    factor = math.sqrt(spiral.config.hidden_size) if scale else 1.0
    torch.testing.assert_close(logits_of(spiral, tokens), logits_of(gpt, tokens, factor), rtol=1e-6, atol=1e-6)
    if scale:  # guards the comparison: the scale changes the logits
        assert not torch.allclose(logits_of(spiral, tokens), logits_of(gpt, tokens), atol=1e-3)


@pytest.mark.parametrize("downscale,upscale", [("self-aggregation", "allocate"), ("mean", "repeat")])
def test_all_ones_residual_equals_looped_transformer(megatron, downscale, upscale):
    spiral = tiny_model(num_core_layers=2, chunk_sizes=(1, 1, 1), downscale=downscale, upscale=upscale,
                        topology="residual")
    looped = gpt_reference(spiral, num_layers=1 + 2 * 3 + 1)
    load_exactly(looped, unrolled_state_dict(spiral, core_repeats=3))
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    factor = math.sqrt(spiral.config.hidden_size)
    torch.testing.assert_close(logits_of(spiral, tokens), logits_of(looped, tokens, factor), rtol=1e-5, atol=1e-5)


def mesh_by_hand(model, tokens):
    """MeSH (arXiv 2510.07739 section 3.2) with chunk sizes all 1, written out from the paper:
    buffer M [B, s, b, h], M_0 = raw embeddings e, the rest 0; transitional step on the prelude
    output p; iteration t: w, r = softmax(W_t h), softmax(R_t h) from the entering state h,
    M_b += w_b (core(h) - h), h <- sum_b r_b M_b."""
    c, topo = model.config, model.loop.topology
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    rope = model.rotary_pos_emb(tokens.shape[1])
    e = model.embedding(input_ids=tokens, position_ids=positions) * math.sqrt(c.hidden_size)  # [s, b, h]
    p = model.prelude(e, None, rotary_pos_emb=rope)

    def route(M, x, write, read, h):
        w = torch.softmax(h @ write.weight.T, dim=-1)  # [s, b, B]
        r = torch.softmax(h @ read.weight.T, dim=-1)
        M = M + torch.einsum("sbk,sbd->ksbd", w, x)
        return M, torch.einsum("sbk,ksbd->sbd", r, M)

    M = torch.zeros((c.mesh_slots,) + e.shape)
    M[0] = e
    M, h = route(M, p, topo.init_write_router, topo.init_read_router, p)
    for t in range(len(c.chunk_sizes)):
        u = model.loop.core(h, None, rotary_pos_emb=rope) - h
        M, h = route(M, u, topo.write_router[str(t)], topo.read_router[str(t)], h)
    h = model.coda(h, None, rotary_pos_emb=rope)
    return model.output_layer(h)[0].transpose(0, 1)  # [b, s, V]


def test_all_ones_mesh_equals_mesh_by_hand(megatron):
    spiral = tiny_model(num_core_layers=2, chunk_sizes=(1, 1, 1), topology="mesh", mesh_slots=4)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        ref = mesh_by_hand(spiral, tokens)
    torch.testing.assert_close(logits_of(spiral, tokens), ref, rtol=1e-5, atol=1e-5)


def test_mesh_routers_are_t_plus_one_pairs_without_bias(megatron):
    spiral = tiny_model(topology="mesh", mesh_slots=5)  # T = 4, d = 32
    routers = {k: v.shape for k, v in spiral.named_parameters() if ".topology." in k}
    assert len(routers) == 2 * (4 + 1) and all(shape == (5, 32) for shape in routers.values())
    assert sum(s.numel() for s in routers.values()) == 2 * (4 + 1) * 32 * 5 == 1600


@pytest.mark.parametrize("topology", ["anchor", "mesh"])
def test_all_ones_with_other_topology_is_not_looped(megatron, topology):
    """Guards the test above: anchor or MeSH with g = 1 is a different network, and it shows."""
    spiral = tiny_model(num_core_layers=2, chunk_sizes=(1, 1, 1), topology=topology)
    looped = gpt_reference(spiral, num_layers=8)
    load_exactly(looped, unrolled_state_dict(spiral, core_repeats=3))
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    factor = math.sqrt(spiral.config.hidden_size)
    assert not torch.allclose(logits_of(spiral, tokens), logits_of(looped, tokens, factor), atol=1e-3)


@pytest.mark.parametrize("name", ["debug", "looped-debug", "gpt-debug"])
def test_unique_parameter_count_of_debug_flavors(megatron, name):
    flavor = flavors.get(name)
    from spiral_megatron import SpiralGPTModel

    torch.manual_seed(0)
    model = SpiralGPTModel(flavor.config(use_cpu_initialization=True), flavor.vocab_size, flavor.seq_length)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == flops.unique_parameters(model.config, flavor.vocab_size)
    expected = {"debug": 269_902, "looped-debug": 268_800, "gpt-debug": 265_600}[name]
    # by hand: 4 layers x 49,984 + 2 x 512 x 64 + final norm 128 = 265,600; + 1,102 resampling
    # (debug); + MeSH routers 2 (T + 1) d B = 2 x 5 x 64 x 5 = 3,200 (debug, looped-debug)
    assert counted == expected


@pytest.mark.parametrize("overrides", [
    dict(topology="mesh", mesh_slots=5), dict(downscale="mean", upscale="repeat"), dict(topology="residual"),
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
