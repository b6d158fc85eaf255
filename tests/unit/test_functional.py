"""The shared loop math (spiral_megatron/functional_spiral.py) against hand-computed values,
in both layouts: Megatron's [s, b, h] (dim 0) and Hugging Face's [b, s, d] (dim 1)."""

import math

import pytest
import torch

from spiral_megatron import functional_spiral as F

S, B, D = 12, 2, 3


def both_layouts(fn, x_sbh, *args):
    """fn over [s, b, h] with dim 0 and over [b, s, h] with dim 1, results in [s, b, h]-first form."""
    a = fn(x_sbh, *args, 0)
    b = fn(x_sbh.transpose(0, 1), *args, 1)
    return a, b.transpose(0, 1)


def test_shift_right_moves_tokens_and_zero_fills():
    x = torch.randn(S, B, D)
    a, b = both_layouts(F.shift_right, x, 3)
    assert torch.equal(a, b)
    assert torch.equal(a[:3], torch.zeros(3, B, D)) and torch.equal(a[3:], x[:-3])
    assert torch.equal(F.shift_right(x, 0, 0), x)
    assert torch.equal(F.shift_right(x, S + 2, 0), torch.zeros_like(x))  # longer than the sequence


@pytest.mark.parametrize("self_aggregation", [True, False], ids=["self-aggregation", "mean"])
def test_aggregate_ignores_front_padding(self_aggregation):
    g, pad = 4, 3
    x = torch.randn(S, B, D)
    w = torch.randn(D, 1)
    x_padded = x.clone()
    x_padded[:pad] = 1e4 if self_aggregation else 0.0  # softmax: any value; mean: the shift's zeros

    def agg(t, dim):
        return F.aggregate(F.chunk(t, g, dim), w.T if self_aggregation else None, pad, dim)

    a, b = both_layouts(agg, x_padded)
    torch.testing.assert_close(a, b)
    real = x[pad:g]  # chunk 0's real tokens
    if self_aggregation:
        weights = torch.softmax(real @ w, dim=0)  # [g - pad, b, 1]
        want0 = (weights * real).sum(0)
        chunks = x.view(S // g, g, B, D)
        want_rest = (torch.softmax(chunks @ w, dim=1) * chunks).sum(1)[1:]
    else:
        want0 = real.mean(0)
        want_rest = x.view(S // g, g, B, D).mean(1)[1:]
    torch.testing.assert_close(a[0], want0)
    torch.testing.assert_close(a[1:], want_rest)


def allocator(g: int, logits: torch.Tensor = None):
    """(weight, bias) of an allocator whose logits are `logits` [g] for every latent (weight 0),
    or random."""
    if logits is None:
        return torch.randn(g, D), torch.randn(g)
    return torch.zeros(g, D), logits


def test_allocate_uniform_beta_keeps_the_chunk_energy():
    g, n = 4, 3
    delta, y = torch.randn(n, B, D), torch.randn(n, B, D)
    weight, bias = allocator(g, torch.zeros(g))  # uniform beta
    a, b = both_layouts(lambda d, dim: F.allocate(y if dim == 0 else y.transpose(0, 1), d, weight, bias, dim), delta)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, delta.repeat_interleave(g, dim=0) / math.sqrt(g))  # sqrt(g) * delta / g
    energy = a.view(n, g, B, D).pow(2).sum(dim=(1, 3))
    torch.testing.assert_close(energy, delta.pow(2).sum(-1))


def test_allocate_one_hot_sends_sqrt_g_delta_to_one_slot():
    g, n = 8, 2
    delta, y = torch.randn(n, B, D), torch.randn(n, B, D)
    logits = torch.full((g,), -1e4)
    logits[5] = 0.0
    u = F.allocate(y, delta, *allocator(g, logits), 0).view(n, g, B, D)
    torch.testing.assert_close(u[:, 5], math.sqrt(g) * delta)
    assert u[:, [0, 1, 2, 3, 4, 6, 7]].abs().max() == 0


def test_repeat():
    delta = torch.randn(3, B, D)
    a, b = both_layouts(F.repeat, delta, 4)
    assert torch.equal(a, b) and torch.equal(a[4:8], delta[1:2].expand(4, B, D))


def test_allocate_and_repeat_shift_as_shift_right():
    g, n, k = 4, 3, 3
    delta, y, (weight, bias) = torch.randn(n, B, D), torch.randn(n, B, D), allocator(g)
    for fn in (lambda d, dim, sh: F.allocate(y if dim == 0 else y.transpose(0, 1), d, weight, bias, dim, sh),
               lambda d, dim, sh: F.repeat(d, g, dim, sh)):
        for shift in (1, k, g):
            a, b = both_layouts(lambda d, dim: fn(d, dim, shift), delta)
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a, F.shift_right(fn(delta, 0, 0), shift, 0))


def test_mesh_buffer_write_and_read():
    e, u, h = torch.randn(S, B, D), torch.randn(S, B, D), torch.ones(S, B, D)
    slots = F.mesh_slots(e, 3)  # [s * b, 3, h], a row per token
    assert torch.equal(slots[:, 0], e.view(-1, D)) and torch.equal(slots[:, 1:], torch.zeros(S * B, 2, D))
    to_slot_1 = torch.tensor([-1e4, 0.0, -1e4])[:, None].expand(3, D) / D  # logits (-1e4, 0, -1e4) on h = 1
    uniform = torch.zeros(3, D)
    read, written = F.mesh_step(slots, u, h, to_slot_1, uniform)
    torch.testing.assert_close(written[:, 1], u.view(-1, D))
    torch.testing.assert_close(written[:, 0], e.view(-1, D))
    torch.testing.assert_close(read, (e + u) / 3)  # uniform read
    read, _ = F.mesh_step(slots, u, h, to_slot_1, to_slot_1)
    torch.testing.assert_close(read, u)
    state = F.init_state("mesh", u, e, (to_slot_1, uniform), 3)
    torch.testing.assert_close(state[0], (e + u) / 3)


def test_mesh_step_gradients_are_autograds():
    """mesh_step's written-out backward gives autograd's gradients of the plain formula."""
    nb = 5
    inputs = [torch.randn(S * B, nb, D), torch.randn(S, B, D), torch.randn(S, B, D), torch.randn(nb, D),
              torch.randn(nb, D)]

    def plain(slots, u, h, write_weight, read_weight):
        w, r = torch.softmax(h @ write_weight.T, -1), torch.softmax(h @ read_weight.T, -1)  # [s, b, B]
        slots = slots + (w[..., None] * u[..., None, :]).view(slots.shape)  # [s * b, B, h]
        return (r.view(-1, nb, 1) * slots).sum(-2).view(h.shape), slots

    outs = []
    for fn in (F.mesh_step, plain):
        leaves = [x.clone().requires_grad_() for x in inputs]
        h, slots = fn(*leaves)
        (h.sin().sum() + slots.cos().sum()).backward()
        outs.append((h, slots, *[x.grad for x in leaves]))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want)

    # the transitional step writes the state its routers read (u None): h's two gradients summed
    outs = []
    for fn in (lambda s, h, w, r: F.mesh_step(s, None, h, w, r), lambda s, h, w, r: plain(s, h, h, w, r)):
        leaves = [x.clone().requires_grad_() for x in (inputs[0], *inputs[2:])]
        h, slots = fn(*leaves)
        (h.sin().sum() + slots.cos().sum()).backward()
        outs.append((h, slots, *[x.grad for x in leaves]))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mesh_step_backward_in_low_precision(dtype):
    """The written-out backward runs in bf16 and fp16 (it mixed an fp32 gradient into a bf16
    matmul) and gives, per input, the fp32 gradients within the format's tolerance."""
    from tests.formats import relative_error, tolerance

    nb, gen = 5, torch.Generator().manual_seed(0)
    shapes = [(S * B, nb, 16), (S, B, 16), (S, B, 16), (nb, 16), (nb, 16)]
    inputs = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]  # the same values in both formats
    grads = {}
    for dt in (torch.float32, dtype):
        leaves = [x.to(dt).requires_grad_() for x in inputs]
        h, slots = F.mesh_step(*leaves)
        assert h.dtype == slots.dtype == dt
        (h.float().sin().sum() + slots.float().cos().sum()).backward()
        grads[dt] = [x.grad for x in leaves]
        assert all(g.dtype == dt for g in grads[dt])
    # the step rounds its result about four times on the way (logits, weights, slots, read)
    tol = tolerance(("fp32", "bf16" if dtype == torch.bfloat16 else "fp16"), depth=4, passes=2)
    for name, got, want in zip(("slots", "u", "h", "write", "read"), grads[dtype], grads[torch.float32]):
        assert relative_error(got, want) <= tol, name


def test_topologies_merge_the_update():
    h, h0, u = torch.randn(S, B, D), torch.randn(S, B, D), torch.randn(S, B, D)
    assert torch.equal(F.update_state("residual", F.init_state("residual", h), u)[0], h + u)
    anchor = F.update_state("anchor", (h, h0), u)
    assert torch.equal(anchor[0], h0 + u) and anchor[1] is h0


def test_schedule_rules():
    assert [F.shift_of(g, "overlap") for g in (8, 1)] == [7, 0] and F.shift_of(4, "no-overlap") == 4
    assert F.padding_multiple((3, 5, 1)) == 15 and F.padding_multiple(()) == 1
    assert F.latent_positions(torch.arange(3), 4, 1, "chunk-end").tolist() == [2, 6, 10]
    assert F.latent_positions(torch.arange(3), 4, 1, "index").tolist() == [0, 1, 2]
    assert list(range(12))[F.latent_slice(3, 4, 1, "chunk-end")] == [2, 6, 10]
    assert list(range(12))[F.latent_slice(3, 4, 1, "index")] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"chunk offset 4 for chunk size 4 must be in \[0, 4\)"):
        F.check_schedule((4,), (4,), "overlap")
