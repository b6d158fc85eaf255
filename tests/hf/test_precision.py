"""The Hugging Face model (spiral_megatron/hf) in bf16 and fp16 against fp32 from the same
weights: every topology, both kinds of down-scale and of up-scale, eager and compiled; logits,
the whole gradient and every parameter's gradient, as tests/unit/test_precision.py does for the
Megatron model (tests/formats.py). What a bf16 or fp16 fine-tune of a converted model computes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from spiral_megatron.hf.configuration_spiral import SpiralFormerConfig
from spiral_megatron.hf.modeling_spiral import SpiralForCausalLM
from tests.formats import DTYPES, LOSS_SCALE, assert_like_fp32, fp32_reference, large_random_weights
from tests.unit.test_precision import BATCH, CONFIGS, SEQ

VOCAB = 48
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_prelude_layers=1,
             num_core_layers=1, num_coda_layers=1, chunk_sizes=(8, 4, 2, 1))
DEPTH = 1 + 1 * 4 + 1  # N_compute


def logits_and_gradients(model, loss_scale: float = 1.0):
    """One forward (no cache) and backward on a fixed batch: (logits [b, s, V] fp32, {name: fp32 gradient})."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1], use_cache=False).logits  # [b, s, V]
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    (loss * loss_scale).backward()
    return logits.detach().float(), {n: p.grad.float() / loss_scale for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def references():
    """name -> (the fp32 model, fp32_reference), built once per configuration."""
    cache = {}

    def get(name):
        if name not in cache:
            model = SpiralForCausalLM(SpiralFormerConfig(**SHAPE, **CONFIGS[name]))
            large_random_weights(model)
            cache[name] = model, fp32_reference(lambda: logits_and_gradients(model), DEPTH)
        return cache[name]
    return get


@pytest.mark.parametrize("fmt", list(LOSS_SCALE))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_in_low_precision_matches_fp32(references, name, fmt):
    fp32, reference = references(name)
    model = copy.deepcopy(fp32).to(DTYPES[fmt])
    assert_like_fp32(fmt, DEPTH, model, logits_and_gradients(model, LOSS_SCALE[fmt]), reference, f"hf {name}")


@pytest.mark.parametrize("fmt", list(LOSS_SCALE))
@pytest.mark.parametrize("name", ["anchor-mean-repeat", "mesh-self-aggregation-allocate"])
def test_compiled_in_low_precision_matches_fp32(references, name, fmt):
    """The model's forward under torch.compile (aot_eager, as in tests/unit/test_precision.py)."""
    fp32, reference = references(name)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = copy.deepcopy(fp32).to(DTYPES[fmt])
    model.forward = torch.compile(model.forward, backend="aot_eager")
    got = logits_and_gradients(model, LOSS_SCALE[fmt])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert_like_fp32(fmt, DEPTH, model, got, reference, f"hf {name} compiled")
