"""Activation recomputation on prelude, core and coda (Megatron's selective and full) and of
whole loop iterations: the same loss and gradients, less memory kept for backward."""

import pytest
import torch

from spiral_megatron import SpiralGPTModel
from spiral_megatron.model.activation_memory import saved_for_backward
from tests.tiny import VOCAB, tiny_config

SEQ = 32
OPTIONS = {
    "selective": dict(recompute_granularity="selective"),
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "loop-iterations": dict(recompute_loop_iterations=True),
    "loop-iterations+full": dict(recompute_loop_iterations=True, recompute_granularity="full",
                                 recompute_method="uniform", recompute_num_layers=1),
}


def run(topology: str, **recompute):
    """(loss, {name: grad}, bytes of activations kept for backward) of one forward+backward."""
    torch.manual_seed(0)
    model = SpiralGPTModel(tiny_config(topology=topology, num_core_layers=2, hidden_dropout=0.1, **recompute),
                           VOCAB, SEQ)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # dropout on: recomputation must replay the same masks
    with saved_for_backward(model) as kept:
        loss = model(tokens[:, :-1], torch.arange(SEQ).expand(2, SEQ), None, labels=tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(kept.values())


@pytest.mark.parametrize("topology", ["residual", "mesh"])
def test_recompute_gives_the_same_gradients_with_less_memory(megatron, topology):
    loss, grads, kept = run(topology)
    for name, options in OPTIONS.items():
        loss_r, grads_r, kept_r = run(topology, **options)
        torch.testing.assert_close(loss_r, loss, rtol=0, atol=0, msg=f"{name}: loss")
        for n in grads:
            torch.testing.assert_close(grads_r[n], grads[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} {n}: {m}")
        print(f"{topology} {name}: {kept_r / 2**10:.0f} KiB kept for backward vs {kept / 2**10:.0f} KiB")
        assert kept_r < kept, f"{name} keeps {kept_r} bytes, no less than {kept} without recompute"


def test_selective_recompute_modules_that_megatron_cannot_run_are_refused():
    """Megatron's MLP recompute returns linear_fc2's bias parameter out of its checkpoint, which
    makes the parameter a non-leaf whose backward re-enters itself without end; its layernorm
    recompute calls Transformer Engine even without fp8 (megatron-core 0.16.1 and 0.19.2, a plain
    GPTModel too): each refused in one line, not a hang or a NameError at the first step."""
    with pytest.raises(ValueError, match="recompute_modules 'mlp' with add_bias_linear true never finishes"):
        tiny_config(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])
    tiny_config(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"], add_bias_linear=False)
    from megatron.core.tensor_parallel.random import HAVE_TE

    if not HAVE_TE:
        with pytest.raises(ValueError, match="recompute_modules 'layernorm' needs Transformer Engine"):
            tiny_config(recompute_granularity="selective", recompute_modules=["layernorm"])
