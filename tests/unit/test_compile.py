"""compile_loop_iteration and compile_layers (issue 15): the loop's iterations and the prelude
and coda layers run as torch.compile'd graphs and give eager's loss and gradients. Dynamo captures the whole iteration, Megatron's core included,
and AOT autograd derives its backward; the test compiles with the `aot_eager` backend (that
capture and the derived backward, without Inductor's code generation, which takes minutes on a
CPU; Inductor gives the same numbers: see docs/MODEL.md section 9)."""

import functools

import pytest
import torch

from tests.tiny import VOCAB, tiny_model

SEQ = 16


def loss_and_gradients(**overrides):
    model = tiny_model(**overrides)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(2, SEQ)
    loss = model(tokens, positions, None, labels=tokens).sum()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [False, True], ids=["whole-step", "recompute-loop-iterations"])
def test_compiled_loop_gives_eager_loss_and_gradients(megatron, monkeypatch, recompute):
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    want_loss, want = loss_and_gradients(recompute_loop_iterations=recompute)
    got_loss, got = loss_and_gradients(recompute_loop_iterations=recompute, compile_loop_iteration=True)
    torch.testing.assert_close(got_loss, want_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_compiled_layers_give_eager_loss_and_gradients(megatron, monkeypatch):
    """Regional compilation: two prelude and two coda layers share one compiled layer graph."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    layers = dict(num_prelude_layers=2, num_coda_layers=2)
    want_loss, want = loss_and_gradients(**layers)
    got_loss, got = loss_and_gradients(**layers, compile_layers=True, compile_loop_iteration=True)
    torch.testing.assert_close(got_loss, want_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
