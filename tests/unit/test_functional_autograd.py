"""The written-out backwards (functional_autograd.py) against autograd's backward of the
formulas written here from docs/MODEL.md section 3, in both layouts ([s, b, h] and
[b, s, h]): fp32 to rounding, bf16 and fp16 within the format's tolerance. The formula path
that torch.compile runs (functional_spiral.py) is held to the same reference."""

import math
from unittest import mock

import pytest
import torch

from spiral_megatron import functional_spiral as F
from tests.formats import relative_error, tolerance

n, G, B, D = 3, 4, 2, 16  # latents, chunk size, batch, width
LOW = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def formula_path():
    """Run functional_spiral's formulas, as under torch.compile."""
    return mock.patch.object(torch.compiler, "is_compiling", return_value=True)


def plain_aggregate(x, weight, first_pad, dim):
    """x [.., n*g, .., h] -> [.., n, .., h]: sum_k softmax_k(x_k a^T) x_k, chunk 0's first slots masked."""
    chunks = x.unflatten(dim, (-1, G))
    scores = chunks @ weight.T  # [.., n, g, .., 1]
    real = torch.ones(chunks.shape[dim : dim + 2], dtype=torch.bool)
    real[0, :first_pad] = False
    real = real.view(real.shape + (1,) * (chunks.dim() - dim - 2))
    return (torch.softmax(scores.masked_fill(~real, -math.inf), dim + 1) * chunks).sum(dim + 1)


def plain_allocate(y, delta, weight, bias, dim, shift):
    """[.., n, .., h] -> [.., n*g, .., h]: slot k of chunk j gets sqrt(g) beta_jk delta_j, shifted right."""
    beta = torch.softmax(y @ weight.T + (bias if bias is not None else 0), -1) * math.sqrt(G)  # [.., n, .., g]
    u = (beta.movedim(-1, dim + 1).unsqueeze(-1) * delta.unsqueeze(dim + 1)).flatten(dim, dim + 1)
    if not shift:
        return u
    zeros = torch.zeros_like(u.narrow(dim, 0, shift))
    return torch.cat([zeros, u.narrow(dim, 0, u.shape[dim] - shift)], dim)


def grads_of(fn, inputs, dtype):
    """fn's output and the gradients of its inputs for a fixed random cotangent."""
    leaves = [x.to(dtype).requires_grad_() if x is not None else None for x in inputs]
    out = fn(*leaves)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    out.backward(cotangent)
    return [out] + [x.grad for x in leaves if x is not None]


def aggregate_inputs(dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n * G, B, D) if dim == 0 else (B, n * G, D), generator=g)
    return [x, torch.randn(1, D, generator=g)]


def allocate_inputs(dim, bias=True):
    g = torch.Generator().manual_seed(1)
    shape = (n, B, D) if dim == 0 else (B, n, D)
    return [torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(G, D, generator=g),
            torch.randn(G, generator=g) if bias else None]


def aggregate(first_pad, dim):
    return lambda x, w: F.aggregate(F.chunk(x, G, dim), w, first_pad, dim)


def allocate(dim, shift):
    return lambda y, d, w, b: F.allocate(y, d, w, b, dim, shift)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("first_pad", [0, 3])
def test_aggregate_and_its_backward_are_the_formulas(dim, first_pad):
    want = grads_of(lambda x, w: plain_aggregate(x, w, first_pad, dim), aggregate_inputs(dim), torch.float32)
    for path in (mock.MagicMock(), formula_path()):  # eager (the Function), then the compiled path's formula
        with path:
            got = grads_of(aggregate(first_pad, dim), aggregate_inputs(dim), torch.float32)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shift", [0, 1, G - 1, G])
@pytest.mark.parametrize("bias", [True, False])
def test_allocate_and_its_backward_are_the_formulas(dim, shift, bias):
    inputs = allocate_inputs(dim, bias)
    want = grads_of(lambda *a: plain_allocate(*a, dim, shift), inputs, torch.float32)
    for path in (mock.MagicMock(), formula_path()):
        with path:
            got = grads_of(allocate(dim, shift), inputs, torch.float32)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [0, 1])
def test_backwards_in_low_precision(dtype, dim):
    """bf16 and fp16 run (a softmax backward in float32, cast back) and give the fp32 values and
    gradients of the same rounded inputs within the format's tolerance."""
    cases = [(aggregate(3, dim), aggregate_inputs(dim)), (allocate(dim, G - 1), allocate_inputs(dim))]
    for fn, inputs in cases:
        inputs = [x.to(dtype) for x in inputs]  # the same values in both formats
        want = grads_of(fn, inputs, torch.float32)
        got = grads_of(fn, inputs, dtype)
        assert all(g.dtype == dtype for g in got)
        tol = tolerance(("fp32", LOW[dtype]), depth=3, passes=2)  # a linear, a softmax and a product
        for i, (g, w) in enumerate(zip(got, want)):
            assert relative_error(g, w) <= tol, (fn, i)
