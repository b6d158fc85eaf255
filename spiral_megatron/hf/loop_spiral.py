"""The SpiralFormer loop in plain PyTorch (docs/MODEL.md sections 2, 3 and 6), batch-first [b, s, d].

One iteration t, chunk size g, offset w, shift s, on token states h:
    x = shift_right(h, w)          chunk j of x = tokens [j*g - w, j*g + g - 1 - w] (front zeros)
    z = downscale_t(x)             [b, s/g, d]   one latent per chunk
    y = core(z)                    [b, s/g, d]   causal over latents, shared weights
    u = upscale_t(y, y - z)        [b, s, d]     the core's update, back on tokens
    u = shift_right(u, s - w)      token i sees only chunks that closed at or before it
    state = topology.write(state, u, t)
Chunk size 1 skips the resampling (no parameters). `forward` runs a whole sequence (and can
fill a `LevelLayer` per iteration); `segment` runs new tokens after those, running the core of
level t on the chunks they close, each row's at its own positions when the batch started
left-padded (docs/MODEL.md section 6). The iteration,
the topologies, the math of each step and where a token sits in a level (its chunk, the update
it receives) are `functional_spiral.py`, which the Megatron model imports too
(`spiral_megatron/functional_spiral.py`, copied beside this file in a converted folder). The
scorers, allocators and MeSH routers are called as modules (PEFT's LoRA adapters wrap them), not
read as weights: this model runs the formulas with autograd's backward, the Megatron model the
written-out backwards of `functional_autograd.py`.
"""

from typing import List, Optional

import torch
from torch import nn

try:  # a converted model folder: the copy beside this file
    from . import functional_spiral as F
    from .functional_spiral import SHIFTS  # noqa: F401 (a `from .x import` line: transformers copies x.py)
except ImportError:  # the spiral_megatron package, where it lives one level up
    from spiral_megatron import functional_spiral as F
from .cache_spiral import LevelLayer
from .layers_spiral import Block, Record, rotary_angles, token_positions


class SpiralLoop(nn.Module):
    """The shared core, the per-iteration resampling (named by the paper) and the topology."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.chunk_sizes, self.offsets, self.shifts = config.chunk_sizes, config.offsets, config.shifts
        d = config.hidden_size
        self.core = Block(config, config.num_core_layers)
        resampled = [t for t, g in enumerate(self.chunk_sizes) if g > 1]
        if config.downscale == "self-aggregation":  # A_t: Linear(d, 1) per iteration [ours]
            self.aggregate = nn.ModuleDict({str(t): nn.Linear(d, 1, bias=False) for t in resampled})
        if config.upscale == "allocate":  # B_t: Linear(d, g) per iteration [ours]
            self.allocate = nn.ModuleDict({str(t): nn.Linear(d, self.chunk_sizes[t]) for t in resampled})
        if config.topology == "mesh":  # MeSH routers: a transitional pair, then one per iteration
            B = config.mesh_slots
            self.mesh_init_write, self.mesh_init_read = nn.Linear(d, B, bias=False), nn.Linear(d, B, bias=False)
            self.mesh_write = nn.ModuleList([nn.Linear(d, B, bias=False) for _ in self.chunk_sizes])
            self.mesh_read = nn.ModuleList([nn.Linear(d, B, bias=False) for _ in self.chunk_sizes])

    # ---- resampling (docs/MODEL.md 3.1 and 3.3) ----
    def downscale(self, t: int, chunks: torch.Tensor, first_pad: int) -> torch.Tensor:
        """chunks [b, n, g, d] -> latents [b, n, d]; the first `first_pad` slots of chunk 0
        are front padding and get no weight."""
        scorer = self.aggregate[str(t)] if self.config.downscale == "self-aggregation" else None
        return F.aggregate(chunks, scorer, first_pad, dim=1)  # [b, n, d]

    def upscale(self, t: int, y: torch.Tensor, delta: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """latent update delta [b, n, d] -> token update [b, n*g, d], shifted right by `shift`."""
        if self.config.upscale == "repeat":
            return F.repeat(delta, self.chunk_sizes[t], dim=1, shift=shift)
        return F.allocate(y, delta, self.allocate[str(t)], None, dim=1, shift=shift)

    def latent_angles(self, t: int, j: torch.Tensor):
        """RoPE angles of latents j: their chunk's last token j*g + g - 1 - w [ours], or j."""
        pos = F.latent_positions(j, self.chunk_sizes[t], self.offsets[t], self.config.latent_positions)
        return rotary_angles(self.config, pos)

    # ---- topology (docs/MODEL.md 3.5) ----
    def init(self, h0: torch.Tensor, embeddings: torch.Tensor):
        """h0: the prelude output [b, s, d]; embeddings: the raw token embeddings [b, s, d]."""
        mesh = self._routers(self.mesh_init_write, self.mesh_init_read) if self.config.topology == "mesh" else None
        return F.init_state(self.config.topology, h0, embeddings, mesh, self.config.mesh_slots)

    def write(self, state, u: torch.Tensor, t: int):
        mesh = self._routers(self.mesh_write[t], self.mesh_read[t]) if self.config.topology == "mesh" else None
        return F.update_state(self.config.topology, state, u, mesh)

    @staticmethod
    def _routers(write: nn.Module, read: nn.Module):
        """h [.., d] -> the (write, read) router logits [.., 2B]."""
        return lambda h: torch.cat([write(h), read(h)], dim=-1)

    # ---- whole sequences ----
    def forward(self, h: torch.Tensor, embeddings: torch.Tensor, levels: Optional[List[LevelLayer]] = None,
                record: Optional[Record] = None) -> torch.Tensor:
        """h: [b, L, d] loop input, padded here at its END to a multiple of every chunk size
        (causality keeps the padding out of real tokens); embeddings: [b, L, d] the raw token
        embeddings (MeSH's slot 0). `levels`: one empty LevelLayer per iteration to fill for
        decoding after these L tokens. Records h(t + 1) after every iteration t."""
        L = h.shape[1]
        S = F.padded_length(L, self.chunk_sizes)
        state = self.init(F.pad_to(h, S, dim=1), F.pad_to(embeddings, S, dim=1))  # [b, S, d] each
        for t in range(len(self.chunk_sizes)):
            u = self.iteration(t, state[0], L, levels[t] if levels is not None else None, record)
            state = self.write(state, u, t)
            if record is not None:
                record.state(F.crop_to(state[0], L, dim=1))
        return F.crop_to(state[0], L, dim=1)  # [b, L, d]

    def iteration(self, t: int, h: torch.Tensor, L: int, level: Optional[LevelLayer] = None,
                  record: Optional[Record] = None) -> torch.Tensor:
        """Iteration t's shifted token update [b, S, d] (functional_spiral.iteration); with
        `level`, also fills it (which needs the update before its shift)."""
        g, w, s = self.chunk_sizes[t], self.offsets[t], self.shifts[t]
        seen = {}  # the core's input and output, the update before the shift

        def core(z):  # [b, n, d]
            seen["z"] = z
            angles = self.latent_angles(t, torch.arange(z.shape[1], device=z.device))
            seen["y"], weights = self.core(z, angles, level.core if level is not None else None, record, states=False)
            if record is not None:
                real = F.closed_chunks(L + g - 1, g, w)  # latents holding a real token; the rest are end padding
                for a in weights:
                    record.attention(None if a is None else a[:, :, :real, :real])
            return seen["y"]

        def upscale(y, delta, k):
            seen["u"] = self.upscale(t, y, delta, k)
            return seen["u"]

        shift_fn = None if level is None else (lambda x, k: F.shift_right(x, k, dim=1))
        u = F.iteration(h, g, w, s, 1, core, lambda c, pad: self.downscale(t, c, pad), upscale,
                        shift_right_fn=shift_fn)  # [b, S, d]
        if level is not None:
            level.fill(F.crop_to(h, L, dim=1), seen["u"] if g > 1 else seen["y"] - seen["z"])
        return u

    # ---- new tokens after cached ones (docs/MODEL.md 6) ----
    def segment(self, h: torch.Tensor, embeddings: torch.Tensor, starts: List[int], levels: List[LevelLayer],
                record: Optional[Record] = None) -> torch.Tensor:
        """h: [b, n, d] loop input of each row's next n tokens, row r's at positions starts[r] ..
        starts[r] + n - 1 (after the starts[r] tokens `levels` hold of it; every row alike unless
        the batch started left-padded); embeddings [b, n, d] their raw embeddings. Updates
        `levels` in place. The topology is per token: no cache needed."""
        state = self.init(h, embeddings)
        for t in range(len(self.chunk_sizes)):
            state = self.write(state, self.segment_iteration(t, state[0], starts, levels[t], record), t)
            if record is not None:
                record.state(state[0])
        return state[0]

    def segment_iteration(self, t: int, h: torch.Tensor, starts: List[int], level: LevelLayer,
                          record: Optional[Record] = None) -> torch.Tensor:
        """The updates [b, n, d] at level t of each row's n tokens from position starts[r]: the
        core runs on one new latent per chunk they close (none, one or several), after the
        level's cached latents. Rows that close different numbers of chunks (a batch that
        started left-padded) all run as many as the most: a row's extra latents and updates go
        where its open chunks' will, which it reads only after closing them, which writes them
        anew. Where a token sits is functional_spiral's: the chunks closed (`closed_chunks`),
        their tokens (`chunk_tokens`), the update a token receives (`update_delay`)."""
        g, w, s = self.chunk_sizes[t], self.offsets[t], self.shifts[t]
        n = h.shape[1]
        firsts = [F.closed_chunks(i, g, w) for i in starts]  # each row's first chunk to close
        k = max(F.closed_chunks(i + n, g, w) - j for i, j in zip(starts, firsts))
        level.append(h, starts)
        weights = [None] * len(self.core.layers)
        if k:  # run the core on k new latents per row
            x = level.chunk_inputs(firsts, k)  # [b, k * g, d]
            z = self._downscale(t, F.chunk(x, g, dim=1), firsts) if g > 1 else x  # [b, k, d]
            angles = self.latent_angles(t, token_positions(firsts, k, h.device))
            y, weights = self.core(z, angles, level.core, record, states=False, positions=firsts)  # [b, k, d]
            level.close(self.upscale(t, y, y - z) if g > 1 else y - z, firsts)  # [b, k * g, d]
        if record is not None:
            for a in weights:
                record.attention(a)
        return level.updates_at([i - F.update_delay(s, w) for i in starts], n)  # [b, n, d]

    def own_latents(self, t: int, weights: torch.Tensor, before: List[int], real: List[int]) -> torch.Tensor:
        """Core attention weights [b, heads, q, m] at level t of a batch whose row r had before[r]
        tokens and runs real[r] real ones more: its queries are the latents from its first chunk
        to close on (`segment`; all of them at the start, before = 0), its keys its latents. Zeros
        for a row's latents of chunks its tokens leave open (extra queries of a row that closes
        fewer chunks than another, a last chunk holding the batch's padding)."""
        g, w = self.chunk_sizes[t], self.offsets[t]
        first = torch.tensor([F.closed_chunks(i, g, w) for i in before], device=weights.device)[:, None]  # [b, 1]
        last = torch.tensor([F.closed_chunks(i + m, g, w) for i, m in zip(before, real)], device=weights.device)[:, None]
        rows = torch.arange(weights.shape[2], device=weights.device) < last - first  # [b, q]
        cols = torch.arange(weights.shape[3], device=weights.device) < last  # [b, m]
        keep = rows[:, None, :, None] & cols[:, None, None, :]  # [b, 1, q, m]
        return torch.where(keep, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))

    def _downscale(self, t: int, chunks: torch.Tensor, firsts: List[int]) -> torch.Tensor:
        """Latents [b, k, d] of chunks [b, k, g, d], row r's from chunk firsts[r] on: chunk 0's
        first w slots are front padding."""
        pads = [max(-F.chunk_tokens(j, self.chunk_sizes[t], self.offsets[t])[0], 0) for j in firsts]
        z = None
        for pad in sorted(set(pads)):  # rows alike: one call
            latents = self.downscale(t, chunks, pad)  # [b, k, d]
            rows = torch.tensor([p == pad for p in pads], device=chunks.device)[:, None, None]
            z = latents if z is None else torch.where(rows, latents, z)
        return z
