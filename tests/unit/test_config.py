"""SpiralConfig validation: every bad value fails with a ValueError that names it."""

import pytest
import torch

from spiral_megatron import SpiralConfig
from spiral_megatron.model.layer_specs import get_spiral_model_spec, have_transformer_engine
from tests.tiny import VOCAB, tiny_config, tiny_model

BASE = dict(hidden_size=32, num_attention_heads=4, num_prelude_layers=1, num_core_layers=1,
            num_coda_layers=1, chunk_sizes=(4, 2, 1))


@pytest.mark.parametrize("overrides,message", [
    (dict(chunk_sizes=()), "chunk_sizes () is an empty schedule but num_core_layers is 1"),
    (dict(num_core_layers=0), "chunk_sizes (4, 2, 1) needs num_core_layers >= 1, got 0"),
    (dict(chunk_sizes=(4, 0)), "chunk size 0 in (4, 0) must be >= 1"),
    (dict(chunk_offsets=(4, 0, 0)), "chunk offset 4 for chunk size 4 must be in [0, 4)"),
    (dict(chunk_offsets=(1, 0)), "chunk offsets (1, 0) must have one entry per chunk size (4, 2, 1)"),
    (dict(downscale="max"), "downscale 'max' must be one of ('self-aggregation', 'mean')"),
    (dict(upscale="copy"), "upscale 'copy' must be one of ('allocate', 'repeat')"),
    (dict(topology="ring"), "topology 'ring' must be one of ('residual', 'anchor', 'mesh')"),
    (dict(shift="left"), "shift 'left' must be one of ('overlap', 'no-overlap')"),
    (dict(latent_positions="middle"), "latent_positions 'middle' must be one of"),
    (dict(mesh_slots=4, topology="residual"), "mesh_slots 4 is only used with topology 'mesh'"),
    (dict(topology="mesh", mesh_slots=1), "mesh_slots 1 must be >= 2"),
    (dict(num_prelude_layers=-1), "num_prelude_layers -1 must be >= 0"),
    (dict(num_prelude_layers=0, num_core_layers=0, num_coda_layers=0, chunk_sizes=()), "at least one layer"),
    (dict(num_layers=5), "num_layers 5 must equal num_prelude_layers + num_core_layers + num_coda_layers = 3"),
])
def test_bad_config_names_the_value(overrides, message):
    with pytest.raises(ValueError) as err:
        SpiralConfig(**{**BASE, **overrides})
    assert message in str(err.value)


def test_derived_fields():
    c = SpiralConfig(**{**BASE, "topology": "mesh", "chunk_sizes": "4,2,1"})
    assert c.num_layers == 3 and c.num_loops == 3 and c.mesh_slots == 4  # N_loop + 3
    assert c.chunk_sizes == (4, 2, 1) and [lv.shift for lv in c.levels] == [3, 1, 0]


def test_defaults_follow_the_papers():
    """MeSH topology, sqrt(d) embeddings, output-projection init by the unrolled depth."""
    c = SpiralConfig(**{**BASE, "init_method_std": 0.02})  # 1 + 1R3 + 1: N_compute = 5, unique 3
    assert c.topology == "mesh" and c.scale_embeddings and c.num_compute_layers == 5
    assert c.output_layer_init_method.keywords["std"] == pytest.approx(0.02 / (2 * 5) ** 0.5, rel=1e-12)
    off = SpiralConfig(**{**BASE, "init_method_std": 0.02, "unrolled_output_init": False})
    assert off.output_layer_init_method.keywords["std"] == pytest.approx(0.02 / (2 * 3) ** 0.5, rel=1e-12)


def test_output_projections_are_drawn_with_the_unrolled_std(megatron):
    """The model's attention and MLP output projections really use it (std within 5%)."""
    model = tiny_model(randomize_resampling=False, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                       num_core_layers=2, init_method_std=0.02)  # N_compute = 1 + 2 x 4 + 1 = 10
    w = torch.cat([p.flatten() for n, p in model.named_parameters()
                   if n.endswith(("linear_proj.weight", "linear_fc2.weight"))])
    assert abs(w.std().item() / (0.02 / 20 ** 0.5) - 1) < 0.05  # unique layers would give 0.02 / 8**0.5


def test_empty_sequence_is_refused(megatron):
    model = tiny_model()
    with pytest.raises(ValueError, match="seq_length 0 must be >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long), None)


def test_bad_position_embedding_is_refused(megatron):
    from spiral_megatron import SpiralGPTModel

    with pytest.raises(ValueError, match="position_embedding_type 'alibi'"):
        SpiralGPTModel(tiny_config(), VOCAB, 64, position_embedding_type="alibi")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend 'triton' must be one of"):
        get_spiral_model_spec(tiny_config(), backend="triton")


@pytest.mark.skipif(have_transformer_engine(), reason="Transformer Engine is installed here")
def test_transformer_engine_spec_without_te_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend 'transformer_engine' needs Transformer Engine"):
        get_spiral_model_spec(tiny_config(), backend="transformer_engine")


@pytest.mark.skipif(not (have_transformer_engine() and torch.cuda.is_available()), reason="needs TE and a GPU")
def test_transformer_engine_spec_builds_on_gpu(megatron):
    from spiral_megatron import SpiralGPTModel

    config = tiny_config(use_cpu_initialization=False)
    model = SpiralGPTModel(config, VOCAB, 64, spec=get_spiral_model_spec(config, "transformer_engine")).cuda()
    tokens = torch.randint(0, VOCAB, (2, 32), device="cuda")
    assert model(tokens, torch.arange(32, device="cuda").expand(2, 32), None).shape == (2, 32, VOCAB)
