"""compile_loop_iteration and compile_layers (issue 15): the loop's iterations and the prelude
and coda layers run as torch.compile'd graphs and give eager's loss and gradients. Dynamo captures the whole iteration, Megatron's core included,
and AOT autograd derives its backward; the test compiles with the `aot_eager` backend (that
capture and the derived backward, without Inductor's code generation, which takes minutes on a
CPU; Inductor gives the same numbers: see docs/MODEL.md section 9).

What compiled is counted with dynamo's own counters (torch._dynamo.utils.counters): the number
of distinct graphs and of graph breaks, each break with its reason. Every region compiles
whole (spiral_megatron/model/compilation.py says what would break it): no break is expected,
and the graphs are one per level of the loop (T = 4 here) plus one shared layer graph.
"""

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from tests.tiny import VOCAB, tiny_model

SEQ = 16
LEVELS = 4  # tiny_config's chunk_sizes (8, 4, 2, 1)


def loss_and_gradients(**overrides):
    model = tiny_model(**overrides)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(2, SEQ)
    loss = model(tokens, positions, None, labels=tokens).sum()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def compiled_like_eager(monkeypatch, **overrides) -> dict:
    """Eager, then compiled with `overrides`: the same loss and every parameter's gradient.
    Returns what dynamo counted while compiling and running the compiled model."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = {k: v for k, v in overrides.items() if not k.startswith("compile_")}
    want_loss, want = loss_and_gradients(**eager)
    torch._dynamo.reset()
    counters.clear()
    got_loss, got = loss_and_gradients(**overrides)
    torch.testing.assert_close(got_loss, want_loss)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] is not None, f"{name}: no gradient through the compiled model"
        torch.testing.assert_close(got[name], want[name], msg=name)
    breaks = {reason.splitlines()[0][:300]: n for reason, n in counters["graph_break"].items()}
    return {"graphs": counters["stats"]["unique_graphs"], "breaks": breaks}


def assert_compiled(seen: dict, graphs: int):
    assert not seen["breaks"], f"{sum(seen['breaks'].values())} graph breaks: {seen['breaks']}"
    assert seen["graphs"] == graphs, f"{seen['graphs']} graphs compiled, expected {graphs}"


def test_compiled_loop_is_one_graph_per_level_and_gives_eager_loss_and_gradients(megatron, monkeypatch):
    """Each level's step (iteration and topology write) is one graph: static shapes, so a level
    is not turned into a symbol (the code before compilation.py: 37 graphs, 69 breaks)."""
    assert_compiled(compiled_like_eager(monkeypatch, compile_loop_iteration=True), graphs=LEVELS)


def test_compiled_loop_under_recompute_gives_eager_loss_and_gradients(megatron, monkeypatch):
    """recompute_loop_iterations: per level the iteration under no_grad (Megatron's checkpoint
    forward), its replay with grad in the backward, and the topology write: 3 graphs a level,
    none broken by the replay running outside the forward (before: 60 graphs, 96 breaks)."""
    seen = compiled_like_eager(monkeypatch, compile_loop_iteration=True, recompute_loop_iterations=True)
    assert_compiled(seen, graphs=3 * LEVELS)


def test_compiled_layers_give_eager_loss_and_gradients(megatron, monkeypatch):
    """Regional compilation: two prelude and two coda layers share one compiled layer graph, next
    to the loop's graph per level (before: 37 graphs, 70 breaks)."""
    layers = dict(num_prelude_layers=2, num_coda_layers=2)
    seen = compiled_like_eager(monkeypatch, **layers, compile_layers=True, compile_loop_iteration=True)
    assert_compiled(seen, graphs=LEVELS + 1)
