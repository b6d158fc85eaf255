"""The loop written out from docs/MODEL.md section 3 in plain PyTorch, for tests to compare with.

It reads nothing from `functional_spiral.py`: shifts are concatenations with zeros, chunks are
masked explicitly, the MeSH buffer is a list of B full-length tensors, and autograd derives
every gradient. It runs a SpiralGPTModel's own modules and weights (embedding, prelude, the
core block, coda, head, the scorer/allocator/router weights), so the model's loss and
gradients must equal this function's, whatever the loop's implementation does to be lean.
"""

import math

import torch

from spiral_megatron.config import schedule


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """x shifted right by k along the sequence (dim 0), zeros in front."""
    if k == 0:
        return x
    return torch.cat([torch.zeros_like(x[:k]), x[:-k]], dim=0)


def _downscale(loop, t: int, x: torch.Tensor, g: int, w: int) -> torch.Tensor:
    """x [S, b, h] -> one latent per chunk of g tokens, chunk 0's first w slots ignored."""
    chunks = x.view(x.shape[0] // g, g, *x.shape[1:])  # [n, g, b, h]
    real = torch.ones(chunks.shape[:2], dtype=torch.bool)
    real[0, :w] = False  # front padding from the offset shift
    real = real[:, :, None, None]
    if loop.config.downscale == "mean":
        return (chunks * real).sum(1) / real.sum(1)
    scores = chunks @ loop.downscale[str(t)].scorer.weight.T  # [n, g, b, 1]
    p = torch.softmax(scores.masked_fill(~real, float("-inf")), dim=1)
    return (p * chunks).sum(1)


def _upscale(loop, t: int, y: torch.Tensor, delta: torch.Tensor, g: int) -> torch.Tensor:
    """Latent update delta [n, b, h] -> token update [n*g, b, h] (not shifted)."""
    if loop.config.upscale == "repeat":
        return delta.repeat_interleave(g, dim=0)
    allocator = loop.upscale[str(t)].allocator
    beta = torch.softmax(y @ allocator.weight.T + allocator.bias, dim=-1) * math.sqrt(g)  # [n, b, g]
    u = beta.permute(0, 2, 1)[..., None] * delta[:, None]  # [n, g, b, h]
    return u.reshape(-1, *delta.shape[1:])


def _mesh(slots, u, h, write_weight, read_weight):
    """MeSH write-read on a list of B slots [S, b, h]: slot_b += w_b u, h' = sum_b r_b slot_b."""
    w, r = torch.softmax(h @ write_weight.T, -1), torch.softmax(h @ read_weight.T, -1)  # [S, b, B]
    slots = [s + w[..., b, None] * u for b, s in enumerate(slots)]
    return sum(r[..., b, None] * s for b, s in enumerate(slots)), slots


def loop(model, h: torch.Tensor, embeddings: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """The loop on h, embeddings [S, b, h] (S padded); rope [S, 1, 1, d] token frequencies."""
    spiral, c = model.loop, model.config
    topology = spiral.topology
    h0 = h
    if c.topology == "mesh":
        slots = [embeddings] + [torch.zeros_like(embeddings)] * (c.mesh_slots - 1)
        h, slots = _mesh(slots, h, h, topology.init_write_router.weight, topology.init_read_router.weight)
    for t, level in enumerate(c.levels):
        g, w, s = level.chunk_size, level.offset, level.shift
        x = _shift(h, w)
        z = x if g == 1 else _downscale(spiral, t, x, g, w)  # [n, b, h]
        j = torch.arange(z.shape[0])
        positions = j * g + g - 1 - w if c.latent_positions == "chunk-end" else j
        y = spiral.core(z, attention_mask=None, rotary_pos_emb=rope[positions])
        u = y - z if g == 1 else _upscale(spiral, t, y, y - z, g)
        u = _shift(u, s - w)
        if c.topology == "residual":
            h = h + u
        elif c.topology == "anchor":
            h = h0 + u
        else:
            h, slots = _mesh(slots, u, h, topology.write_router[str(t)].weight, topology.read_router[str(t)].weight)
    return h


def loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token loss [b, s] of `model` (one process, no pipeline) with the loop above."""
    c = model.config
    L = tokens.shape[1]
    positions = torch.arange(L).expand_as(tokens)
    x = model.embedding(input_ids=tokens, position_ids=positions)  # [s, b, h]
    if c.scale_embeddings:
        x = x * math.sqrt(c.hidden_size)
    S = schedule.padded_length(L, c.levels)
    rope = model.rotary_pos_emb(S)
    h = model.prelude(x, None, rotary_pos_emb=rope[:L])
    pad = torch.zeros((S - L,) + x.shape[1:])
    h = loop(model, torch.cat([h, pad]), torch.cat([x, pad]), rope)[:L]
    h = model.coda(h, None, rotary_pos_emb=rope[:L])
    logits, _ = model.output_layer(h)
    return model.compute_language_model_loss(tokens, logits)
