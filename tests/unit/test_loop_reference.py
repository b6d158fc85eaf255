"""The model's loss and every gradient equal those of the loop written out in plain PyTorch
(tests/reference_loop.py), for each option of docs/MODEL.md section 3: the lean loop
(functional_autograd.py's written-out backwards, views for shifts, token-row MeSH slots) keeps
the math, fp32 to rounding."""

import pytest
import torch

from tests import reference_loop
from tests.tiny import VOCAB, tiny_model

CASES = {
    # name: (SpiralConfig overrides, sequence length)
    "default-8421": ({}, 32),
    "padded-length": ({}, 29),
    "offsets-mean-repeat": (dict(chunk_sizes=(8, 4, 2, 1), chunk_offsets=(3, 1, 1, 0), downscale="mean",
                                 upscale="repeat"), 32),
    "offsets-no-overlap": (dict(chunk_offsets=(5, 2, 0, 0), shift="no-overlap", latent_positions="index"), 32),
    "residual-fine-to-coarse": (dict(topology="residual", chunk_sizes=(1, 2, 4, 8)), 32),
    "anchor-16": (dict(topology="anchor", chunk_sizes=(16, 8, 4, 2, 1), chunk_offsets=(7, 0, 3, 1, 0)), 32),
}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_equal_the_plain_loop(megatron, case):
    overrides, seq = CASES[case]
    model = tiny_model(num_core_layers=2, **overrides)
    tokens = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (lambda: model(tokens, torch.arange(seq).expand(2, seq), None, labels=tokens),
               lambda: reference_loop.loss(model, tokens)):
        model.zero_grad(set_to_none=True)
        loss = fn().sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    # atol: rtol x the largest gradient entry of the model (tests/distributed/test_layouts.py's
    # rule): gradients near zero, e.g. of MeSH's routers, are summation-order noise below it
    largest = max(g.abs().max().item() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 0, f"{name} has no gradient in the reference"
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5 * largest, msg=lambda m: f"{name}: {m}")
