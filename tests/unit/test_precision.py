"""SpiralGPTModel in bf16 and fp16 against fp32 from the same weights: every topology, both
kinds of down-scale and of up-scale, eager (MeSH through its written-out backward, `_MeshStep`)
and compiled (torch.compile derives the backward of the plain formula).

Compared (tests/formats.py): the logits at the forward tolerance of the unrolled depth, the
gradient as a whole at the backward tolerance, and the gradient of every parameter on its own,
at the larger of that tolerance and what the format's rounding, simulated on the fp32 model,
does to that parameter (`noise_tolerances`). Large random weights, so that every path carries
gradient; fp16 scales the loss as Megatron's grad scaler does. Compilation uses the `aot_eager`
backend (dynamo's capture and AOT autograd's backward, without Inductor's code generation,
which takes minutes on a CPU; see tests/unit/test_compile.py).
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from spiral_megatron import SpiralGPTModel
from tests.formats import DTYPES, LOSS_SCALE, assert_like_fp32, fp32_reference, large_random_weights
from tests.tiny import VOCAB, tiny_config

SEQ, BATCH = 16, 2
# Every topology with each kind of down-scale and of up-scale (the kinds are separate modules).
CONFIGS = {
    f"{topology}-{down}-{up}": dict(topology=topology, downscale=down, upscale=up)
    for topology in ("residual", "anchor", "mesh")
    for down, up in (("self-aggregation", "allocate"), ("mean", "repeat"))
}
_TINY = tiny_config()
DEPTH = _TINY.num_prelude_layers + _TINY.num_core_layers * len(_TINY.chunk_sizes) + _TINY.num_coda_layers  # N_compute


def build(fmt: str, **overrides) -> SpiralGPTModel:
    """The tiny model in `fmt` (parameters, Megatron's bf16/fp16 flags), as the job builds it."""
    config = tiny_config(params_dtype=DTYPES[fmt], bf16=fmt == "bf16", fp16=fmt == "fp16", **overrides)
    return SpiralGPTModel(config, vocab_size=VOCAB, max_sequence_length=64)


def logits_and_gradients(model, loss_scale: float = 1.0):
    """One forward and backward on a fixed batch: (logits [b, s, V] in fp32, {name: fp32 gradient})."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1], torch.arange(SEQ).expand(BATCH, SEQ), None)  # [b, s, V]
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    (loss * loss_scale).backward()
    return logits.detach().float(), {n: p.grad.float() / loss_scale for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def references(megatron):
    """name -> (fp32 weights, fp32_reference), built once per configuration."""
    cache = {}

    def get(name):
        if name not in cache:
            model = build("fp32", **CONFIGS[name])
            large_random_weights(model)
            cache[name] = model.state_dict(), fp32_reference(lambda: logits_and_gradients(model), DEPTH)
        return cache[name]
    return get


def build_from(weights, fmt: str, **overrides) -> SpiralGPTModel:
    model = build(fmt, **overrides)
    model.load_state_dict(weights)
    return model


@pytest.mark.parametrize("fmt", list(LOSS_SCALE))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_in_low_precision_matches_fp32(references, name, fmt):
    weights, reference = references(name)
    model = build_from(weights, fmt, **CONFIGS[name])
    assert_like_fp32(fmt, DEPTH, model, logits_and_gradients(model, LOSS_SCALE[fmt]), reference, name)


# every topology and kind compiled once, every format at least once, the default (MeSH) in both: a
# compiled graph differs between formats only in its dtype (2 runs fewer: about 20 s of CI)
@pytest.mark.parametrize("name,fmt", [("residual-mean-repeat", "bf16"), ("anchor-self-aggregation-allocate", "fp16"),
                                      ("mesh-self-aggregation-allocate", "bf16"),
                                      ("mesh-self-aggregation-allocate", "fp16")])
def test_compiled_in_low_precision_matches_fp32(references, monkeypatch, name, fmt):
    """The loop's iterations and the prelude and coda layers compiled (compile_loop_iteration,
    compile_layers); at least one graph must have been compiled."""
    weights, reference = references(name)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = build_from(weights, fmt, compile_loop_iteration=True, compile_layers=True, **CONFIGS[name])
    got = logits_and_gradients(model, LOSS_SCALE[fmt])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert_like_fp32(fmt, DEPTH, model, got, reference, f"{name} compiled")
