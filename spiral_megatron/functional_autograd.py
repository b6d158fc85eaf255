"""The loop's learned steps as autograd Functions with their backward written out (eager mode).

`functional_spiral.py` writes each step as its formula; in eager mode it runs the Functions
here instead. Autograd's own backward of a formula dispatches a node per view, broadcast,
linear and reduction; a GPU launches a kernel for most of them, and the loop's steps act on
few tokens at the coarse levels, so they cost launches, not FLOPs (issues 15 and 23). Here each
step is one node with its linear inside, and its backward is the products and reductions the
math needs. Under torch.compile the formulas run, and the compiler derives and fuses the
backward itself (it cannot fuse a written-out one).

Same values as autograd's backward of the formulas (tests/unit/test_functional_autograd.py):
fp32 to rounding, bf16 and fp16 within the format's tolerance. A softmax runs in float32 and is
returned in the input's dtype; its backward runs in float32 too (the only dtype mix CUDA's
kernel takes is an fp16 input with an fp32 gradient), then casts to the logits' dtype.
Imports only torch and the standard library (it ships beside functional_spiral.py).
"""

import math

import torch
from torch.autograd.function import once_differentiable


def _softmax_backward(grad: torch.Tensor, p32: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of logits (in `dtype`) from that of p = softmax_fp32(logits) (p32: float32)."""
    return torch._softmax_backward_data(grad.float(), p32, dim, torch.float32).to(dtype)


def _as(x: torch.Tensor, shape) -> torch.Tensor:
    """x reshaped to `shape`; x itself where it has that shape already (no op dispatched)."""
    return x if x.shape == shape else x.reshape(shape)


def _pad(x: torch.Tensor, dim: int, front: int, back: int = 0) -> torch.Tensor:
    """Zeros added at the front and back of `dim` (a negative count drops entries instead)."""
    return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [front, back])


class Aggregate(torch.autograd.Function):
    """`functional_spiral.aggregate` with its scorer: z_j = sum_k p_jk x_jk, p_j = softmax_k(x_jk a^T).

    chunks [.., n, g, .., h] (chunk j at `dim`, slot k at dim + 1), a view of contiguous token
    states; weight a [1, h]. Backward, with G = dL/dz broadcast over the slots:
        dL/dp = <G, x>   dL/ds = softmax'(p) dL/dp   dL/dx = p G + dL/ds a   dL/da = sum dL/ds x
    """

    @staticmethod
    def forward(ctx, chunks, weight, first_pad: int, dim: int):
        rows = chunks.reshape(-1, chunks.shape[-1])  # [M, h], a view
        scores = torch.mm(rows, weight.t()).view(chunks.shape[:-1] + (1,))  # [.., n, g, .., 1]
        if first_pad:  # chunk 0's front padding takes no weight [ours]
            scores.narrow(dim, 0, 1).narrow(dim + 1, 0, first_pad).fill_(float("-inf"))
        p32 = torch.softmax(scores, dim=dim + 1, dtype=torch.float32)
        p = p32.to(chunks.dtype)
        ctx.dim = dim
        ctx.save_for_backward(chunks, rows, weight, p32, p)
        return (p * chunks).sum(dim + 1)  # [.., n, .., h]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z):
        chunks, rows, weight, p32, p = ctx.saved_tensors
        k = ctx.dim + 1
        grad_z = grad_z.unsqueeze(k)  # [.., n, 1, .., h]
        grad_p = (grad_z * chunks).sum(-1, keepdim=True)  # [.., n, g, .., 1]
        grad_scores = _softmax_backward(grad_p, p32, k, chunks.dtype)  # [.., n, g, .., 1]
        grad_chunks = torch.addcmul(p * grad_z, grad_scores, weight)  # [.., n, g, .., h]
        grad_weight = torch.mm(grad_scores.view(1, -1), rows)  # [1, h]
        return grad_chunks, grad_weight, None, None


class Allocate(torch.autograd.Function):
    """`functional_spiral.allocate` with its allocator: slot k of chunk j receives
    sqrt(g) beta_jk delta_j, beta_j = softmax(B y_j + b), shifted right by `shift` (0 <= shift
    <= g) in one pad of the product.

    y, delta [P.., n, Q.., h] (latent j at `dim`); weight B [g, h], bias b [g] or None. The
    logits come out of one batched product per latent, [P*n, g, Q], already laid out like the
    chunks (slot k after latent j), so the product with delta is written in the token order
    without a transposing copy (the formula's movedim), and the shift is one pad of it.
    Backward, with U = dL/du shifted back left (zeros where the shift dropped tokens):
        dL/dbeta = sqrt(g) <U, delta>   dL/ddelta = sum_k beta_k U_k
        dL/dl = softmax'(beta) dL/dbeta   dL/dy = dL/dl^T B   dL/dB = sum dL/dl y   dL/db = sum dL/dl
    """

    @staticmethod
    def forward(ctx, y, delta, weight, bias, dim: int, shift: int):
        g, h = weight.shape
        batch = (math.prod(y.shape[: dim + 1]), math.prod(y.shape[dim + 1 : -1]), h)  # (P*n, Q, h)
        latents = _as(y, batch)  # [P*n, Q, h]
        weights = weight.expand(batch[0], g, h)  # [P*n, g, h]
        if bias is None:
            logits = torch.bmm(weights, latents.transpose(1, 2))  # [P*n, g, Q]
        else:
            logits = torch.baddbmm(bias.view(g, 1), weights, latents.transpose(1, 2))
        beta32 = torch.softmax(logits, dim=1, dtype=torch.float32)
        beta = beta32.to(y.dtype) * math.sqrt(g)  # sqrt(g) on the small weights, not on the update
        beta = beta.view(y.shape[: dim + 1] + (g,) + y.shape[dim + 1 : -1] + (1,))  # [.., n, g, .., 1]
        delta = delta.unsqueeze(dim + 1)  # [.., n, 1, .., h]
        ctx.dim, ctx.shift, ctx.has_bias = dim, shift, bias is not None
        ctx.save_for_backward(latents, weights, beta32, beta, delta)
        u = (beta * delta).flatten(dim, dim + 1)  # [.., n*g, .., h]
        return _pad(u, dim, shift, -shift) if shift else u  # shifted right, the last `shift` dropped

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u):
        latents, weights, beta32, beta, delta = ctx.saved_tensors
        dim, shift, g = ctx.dim, ctx.shift, weights.shape[1]
        if shift:  # the shift's gradient: back left by `shift`, zeros where it dropped tokens
            grad_u = _pad(grad_u, dim, -shift, shift)
        grad_u = grad_u.unflatten(dim, (-1, g))  # [.., n, g, .., h]
        grad_delta = (grad_u * beta).sum(dim + 1)  # [.., n, .., h]
        grad_beta = _as((grad_u * delta).sum(-1), beta32.shape)  # [P*n, g, Q]
        grad_logits = _softmax_backward(grad_beta * math.sqrt(g), beta32, 1, latents.dtype)  # [P*n, g, Q]
        grad_y = _as(torch.bmm(grad_logits.transpose(1, 2), weights), grad_delta.shape)  # [.., n, .., h]
        grad_weight = torch.bmm(grad_logits, latents).sum(0)  # [g, h]
        grad_bias = grad_logits.sum((0, 2)) if ctx.has_bias else None
        return grad_y, grad_delta, grad_weight, grad_bias, None, None


class MeshStep(torch.autograd.Function):
    """`functional_spiral.mesh_step`: every token is a row, slots [N, B, h]; both routers in
    one matmul and one softmax; backward 4 bmm, 2 mm and one softmax backward (issue 15).
        slots' = slots + w u^T     h' = r^T slots'     (w, r) = softmax(h [W; R]^T)
    u None: u = h (the transitional step writes the state its routers read); its two
    gradients are then summed in the routers' matmul (an addmm), not by autograd's engine.
    """

    @staticmethod
    def forward(ctx, slots, u, h, write_weight, read_weight):
        B, d = write_weight.shape
        weight = torch.cat([write_weight, read_weight])  # [2B, d]
        h2 = h.reshape(-1, d)  # [N, d]
        p32 = torch.softmax(torch.mm(h2, weight.t()).view(-1, 2, B), dim=-1, dtype=torch.float32)
        p = p32.to(h.dtype)  # [N, 2, B]: (write, read) weights
        w, r = p.split(1, dim=1)  # [N, 1, B] each
        ctx.writes_h = u is None
        u = (h if u is None else u).reshape(-1, 1, d)  # [N, 1, d]
        new_slots = torch.baddbmm(slots, w.transpose(1, 2), u)  # [N, B, d]
        new_h = torch.bmm(r, new_slots)  # [N, 1, d]
        ctx.set_materialize_grads(False)  # the last step's slots get no gradient
        ctx.save_for_backward(h2, weight, p32, w, r, u, new_slots)
        # Returned as views of what is saved (saving an output costs a detach each way); h' as
        # a tensor autograd does not see as a view: Megatron's blocks copy a view input anew.
        return torch.ops.aten._unsafe_view(new_h, h.shape), new_slots.view(new_slots.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, grad_slots):
        h2, weight, p32, w, r, u, new_slots = ctx.saved_tensors
        B = weight.shape[0] // 2
        grad_h3 = grad_h.reshape(-1, 1, h2.shape[1])  # [N, 1, d]
        # the read h' = r^T slots' adds r grad_h^T to the written slots' own gradient
        if grad_slots is None:
            grad_new = torch.bmm(r.transpose(1, 2), grad_h3)  # [N, B, d]
        else:
            grad_new = torch.baddbmm(grad_slots, r.transpose(1, 2), grad_h3)
        grad_p = torch.cat([torch.bmm(u, grad_new.transpose(1, 2)),  # write weights [N, 1, B]
                            torch.bmm(grad_h3, new_slots.transpose(1, 2))], dim=1)  # read weights: [N, 2, B]
        grad_u = torch.bmm(w, grad_new)  # [N, 1, d]
        grad_logits = _softmax_backward(grad_p, p32, -1, h2.dtype).view(-1, 2 * B)  # [N, 2B]
        grad_weight = torch.mm(grad_logits.t(), h2)  # [2B, d]
        if ctx.writes_h:  # h's gradient as the write's plus the routers'
            grad_h_in = torch.addmm(grad_u.view(h2.shape), grad_logits, weight).view(grad_h.shape)  # [.., d]
            return (grad_new, None, grad_h_in, *grad_weight.split(B))
        grad_h_in = torch.mm(grad_logits, weight).view(grad_h.shape)  # [.., d]
        return (grad_new, grad_u.view(grad_h.shape), grad_h_in, *grad_weight.split(B))
