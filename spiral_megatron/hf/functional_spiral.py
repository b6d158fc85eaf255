"""The loop's pure math, the one source for the Megatron model and the Hugging Face model.

docs/MODEL.md sections 2-3. Plain functions over tensors, no parameters: each side applies its
own Linear layers (Megatron's ReplicatedLinear, torch's nn.Linear) and passes the scores in.
Every function that touches the sequence takes its dimension `dim` explicitly: 0 for
Megatron's [s, b, h], 1 for Hugging Face's [b, s, d]. Imports only torch and the standard
library, so it ships inside every converted model folder (see `spiral_megatron.hf.MODEL_FILES`).
"""

import math
from typing import Optional, Sequence, Tuple

import torch

SHIFTS = ("overlap", "no-overlap")


# ---- the schedule (docs/MODEL.md section 2) ----
def check_schedule(chunk_sizes: Sequence[int], offsets: Optional[Sequence[int]], shift: str) -> None:
    """Refuse a schedule the loop cannot run; errors name the bad value and the rule."""
    if shift not in SHIFTS:
        raise ValueError(f"shift {shift!r} must be one of {SHIFTS}")
    offsets = tuple(offsets) if offsets is not None else (0,) * len(chunk_sizes)
    if len(offsets) != len(chunk_sizes):
        raise ValueError(f"chunk offsets {offsets} must have one entry per chunk size {tuple(chunk_sizes)}")
    for g, w in zip(chunk_sizes, offsets):
        if g < 1:
            raise ValueError(f"chunk size {g} in {tuple(chunk_sizes)} must be >= 1")
        if not 0 <= w < g:
            raise ValueError(f"chunk offset {w} for chunk size {g} must be in [0, {g})")


def shift_of(chunk_size: int, shift: str) -> int:
    """s_t: g - 1 ("overlap", the paper) or g ("no-overlap")."""
    return chunk_size - 1 if shift == "overlap" else chunk_size


def padding_multiple(chunk_sizes: Sequence[int]) -> int:
    """The loop pads the sequence at its end to a multiple of every chunk size."""
    return math.lcm(*chunk_sizes) if len(chunk_sizes) else 1


def latent_positions(j: torch.Tensor, chunk_size: int, offset: int, mode: str) -> torch.Tensor:
    """Rotary position of latents j: their chunk's last token j*g + g - 1 - w ("chunk-end",
    [ours]) or the latent index j ("index")."""
    return j * chunk_size + (chunk_size - 1 - offset) if mode == "chunk-end" else j


# ---- resampling (docs/MODEL.md section 3, steps 1, 3 and 4) ----
def softmax_fp32(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax computed in float32, returned in the input's dtype (bf16/fp16 safe)."""
    return torch.softmax(scores.float(), dim=dim).to(scores.dtype)


def shift_right(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """out[i] = x[i - k] along `dim`, zeros for i < k (the causal shift, one process)."""
    if k == 0:
        return x
    n = x.shape[dim]
    head = x.new_zeros(x.shape[:dim] + (min(k, n),) + x.shape[dim + 1 :])
    return torch.cat([head, x.narrow(dim, 0, n - min(k, n))], dim=dim)


def chunk(x: torch.Tensor, g: int, dim: int) -> torch.Tensor:
    """Split `dim` (length a multiple of g) into (chunk j, slot k): [.., n, g, ..]."""
    return x.unflatten(dim, (x.shape[dim] // g, g))


def aggregate(chunks: torch.Tensor, scores: Optional[torch.Tensor], first_pad: int, dim: int) -> torch.Tensor:
    """One latent per chunk: chunks [.., n, g, .., h] (chunk j at `dim`, slot k at dim + 1).

    scores (same shape, last dim 1): self-aggregation, latent = sum_k softmax_k(score) x_k;
    None: the mean. The first `first_pad` slots of chunk 0 are front padding (zeros from the
    offset shift) and take no weight in the softmax nor a place in the mean [ours].
    """
    n, g = chunks.shape[dim], chunks.shape[dim + 1]
    if scores is None:
        z = chunks.mean(dim=dim + 1)  # [.., n, .., h]
        if first_pad:  # padded slots are zero: rescale chunk 0 to the mean of its real tokens
            scale = torch.ones(n, dtype=z.dtype, device=z.device)
            scale[0] = g / (g - first_pad)
            z = z * scale.view(n, *([1] * (z.dim() - dim - 1)))
        return z
    if first_pad:
        pad = torch.zeros(n, g, dtype=torch.bool, device=chunks.device)
        pad[0, :first_pad] = True
        scores = scores.masked_fill(pad.view(n, g, *([1] * (scores.dim() - dim - 2))), float("-inf"))
    weights = softmax_fp32(scores, dim=dim + 1)  # [.., n, g, .., 1]
    return (weights * chunks).sum(dim=dim + 1)  # [.., n, .., h]


def allocate(logits: torch.Tensor, delta: torch.Tensor, dim: int) -> torch.Tensor:
    """Latent update delta [.., n, .., h] -> token update [.., n*g, .., h]: slot k of chunk j
    receives sqrt(g) * beta_jk * delta_j, beta_j = softmax(logits_j) over the g slots
    (logits [.., n, .., g], the allocator on the core's OUTPUT latent) [ours: input and
    sqrt(g), so that at uniform beta the chunk's update energy sum_k |u_k|^2 is |delta|^2]."""
    g = logits.shape[-1]
    beta = softmax_fp32(logits, dim=-1).movedim(-1, dim + 1).unsqueeze(-1)  # [.., n, g, .., 1]
    slots = beta * delta.unsqueeze(dim + 1)  # [.., n, g, .., h]
    return (math.sqrt(g) * slots).flatten(dim, dim + 1)


def repeat(delta: torch.Tensor, g: int, dim: int) -> torch.Tensor:
    """Latent update delta [.., n, .., h] -> every token of chunk j receives delta_j."""
    return delta.repeat_interleave(g, dim=dim)


# ---- topologies (docs/MODEL.md section 3, step 5) ----
def residual_write(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h <- h + u [ours]."""
    return h + u


def anchor_write(h0: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h <- h0 + u, h0 the loop input (the paper's anchor baseline)."""
    return h0 + u


def mesh_slots(embeddings: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The MeSH buffer before the transitional write: slot 0 = the raw token embeddings (before
    the prelude), the other B - 1 slots zeros. -> [B, *embeddings.shape]"""
    rest = embeddings.new_zeros((num_slots - 1,) + tuple(embeddings.shape))
    return torch.cat([embeddings.unsqueeze(0), rest], dim=0)


def mesh_write(slots: torch.Tensor, u: torch.Tensor, write_logits: torch.Tensor) -> torch.Tensor:
    """slot_b += u * softmax_b(write_logits): slots [B, .., h], u [.., h], write_logits [.., B]."""
    w = softmax_fp32(write_logits, dim=-1).movedim(-1, 0).unsqueeze(-1)  # [B, .., 1]
    return slots + w * u.unsqueeze(0)


def mesh_read(slots: torch.Tensor, read_logits: torch.Tensor) -> torch.Tensor:
    """h = sum_b slot_b * softmax_b(read_logits): slots [B, .., h], read_logits [.., B] -> [.., h]."""
    r = softmax_fp32(read_logits, dim=-1).movedim(-1, 0).unsqueeze(-1)  # [B, .., 1]
    return (r * slots).sum(dim=0)

