"""The SpiralFormer loop in plain PyTorch (docs/MODEL.md sections 2, 3 and 6), batch-first [b, s, d].

One iteration t, chunk size g, offset w, shift s, on token states h:
    x = shift_right(h, w)          chunk j of x = tokens [j*g - w, j*g + g - 1 - w] (front zeros)
    z = downscale_t(x)             [b, s/g, d]   one latent per chunk
    y = core(z)                    [b, s/g, d]   causal over latents, shared weights
    u = upscale_t(y, y - z)        [b, s, d]     the core's update, back on tokens
    u = shift_right(u, s - w)      token i sees only chunks that closed at or before it
    state = topology.write(state, u, t)
Chunk size 1 skips the resampling (no parameters). `forward` runs a whole sequence (and can
record a `LevelCache` per iteration); `step` runs one new token against those caches, running
the core of level t only when the token closes one of its chunks (docs/MODEL.md section 6).
The iteration, the topologies and the math of each step are `functional_spiral.py`, which the
Megatron model imports too (`spiral_megatron/functional_spiral.py`, copied beside this file in a
converted folder).
"""

from typing import Dict, List, Optional

import torch
from torch import nn

try:  # a converted model folder: the copy beside this file (trust_remote_code copies the
    # files named in `from .x import` lines)
    from . import functional_spiral as F
    from .functional_spiral import SHIFTS  # noqa: F401
except ImportError:  # the spiral_megatron package, where it lives one level up
    from spiral_megatron import functional_spiral as F
from .layers_spiral import KV, Block, rotary_angles


class LevelCache:
    """What level t keeps between tokens: the core's latent (k, v) per core layer, the token
    states of the chunk not yet closed (x-space, front zeros included), and the token-level
    updates (before the shift) of the last two closed chunks, by chunk index."""

    def __init__(self, kv: List[KV], pending: torch.Tensor, closed: Dict[int, torch.Tensor]):
        self.kv, self.pending, self.closed = kv, pending, closed

    def map(self, fn) -> None:
        """Apply `fn` to every batch-first tensor (e.g. reorder rows for beam search)."""
        self.kv = [(fn(k), fn(v)) for k, v in self.kv]
        self.pending = fn(self.pending)
        self.closed = {j: fn(u) for j, u in self.closed.items()}


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
        scorer = self.aggregate[str(t)].weight if self.config.downscale == "self-aggregation" else None
        return F.aggregate(chunks, scorer, first_pad, dim=1)  # [b, n, d]

    def upscale(self, t: int, y: torch.Tensor, delta: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """latent update delta [b, n, d] -> token update [b, n*g, d], shifted right by `shift`."""
        if self.config.upscale == "repeat":
            return F.repeat(delta, self.chunk_sizes[t], dim=1, shift=shift)
        allocator = self.allocate[str(t)]
        return F.allocate(y, delta, allocator.weight, allocator.bias, dim=1, shift=shift)

    def latent_angles(self, t: int, j: torch.Tensor):
        """RoPE angles of latents j: their chunk's last token j*g + g - 1 - w [ours], or j."""
        pos = F.latent_positions(j, self.chunk_sizes[t], self.offsets[t], self.config.latent_positions)
        return rotary_angles(self.config, pos)

    # ---- topology (docs/MODEL.md 3.5) ----
    def init(self, h0: torch.Tensor, embeddings: torch.Tensor):
        """h0: the prelude output [b, s, d]; embeddings: the raw token embeddings [b, s, d]."""
        mesh = (self.mesh_init_write.weight, self.mesh_init_read.weight) if self.config.topology == "mesh" else None
        return F.init_state(self.config.topology, h0, embeddings, mesh, self.config.mesh_slots)

    def write(self, state, u: torch.Tensor, t: int):
        mesh = (self.mesh_write[t].weight, self.mesh_read[t].weight) if self.config.topology == "mesh" else None
        return F.update_state(self.config.topology, state, u, mesh)

    # ---- whole sequences ----
    def forward(self, h: torch.Tensor, embeddings: torch.Tensor,
                caches: Optional[List[LevelCache]] = None) -> torch.Tensor:
        """h: [b, L, d] loop input, padded here at its END to a multiple of every chunk size
        (causality keeps the padding out of real tokens); embeddings: [b, L, d] the raw token
        embeddings (MeSH's slot 0). If `caches` is a list, one LevelCache per iteration is
        appended for decoding after these L tokens."""
        b, L, d = h.shape
        m = self.config.padding_multiple
        S = -(-L // m) * m
        if S > L:
            h = torch.cat([h, h.new_zeros(b, S - L, d)], dim=1)  # [b, S, d]
            embeddings = torch.cat([embeddings, embeddings.new_zeros(b, S - L, d)], dim=1)
        state = self.init(h, embeddings)
        for t in range(len(self.chunk_sizes)):
            state = self.write(state, self.iteration(t, state[0], L, caches), t)
        return state[0][:, :L]

    def iteration(self, t: int, h: torch.Tensor, L: int, caches) -> torch.Tensor:
        """Iteration t's shifted token update [b, S, d] (functional_spiral.iteration); with
        `caches`, also this level's LevelCache (which needs the update before its shift)."""
        g, w, s = self.chunk_sizes[t], self.offsets[t], self.shifts[t]
        seen = {}  # the core's input/output and keys/values, the update before the shift

        def core(z):  # [b, n, d]
            n = z.shape[1]
            seen["z"] = z
            seen["y"], seen["kv"] = self.core(z, self.latent_angles(t, torch.arange(n, device=z.device)))
            return seen["y"]

        def upscale(y, delta, k):
            seen["u"] = self.upscale(t, y, delta, k)
            return seen["u"]

        shift_fn = None if caches is None else (lambda x, k: F.shift_right(x, k, dim=1))
        u = F.iteration(h, g, w, s, 1, core, lambda c, pad: self.downscale(t, c, pad), upscale,
                        shift_right_fn=shift_fn)  # [b, S, d]
        if caches is not None:
            unshifted = seen["u"] if g > 1 else seen["y"] - seen["z"]
            caches.append(self._level_cache(h, unshifted, seen["kv"], g, w, L))
        return u

    @staticmethod
    def _level_cache(h, u, kv, g: int, w: int, L: int) -> LevelCache:
        """Level state after L real tokens: only the n_c chunks that closed are kept (the core
        is causal, so their keys/values do not depend on the padded tail)."""
        n_c = (L + w) // g  # chunk j is closed once token j*g + g - 1 - w <= L - 1
        start = n_c * g - w  # first token of the open chunk (negative: front padding)
        pending = h[:, max(start, 0) : L]
        if start < 0:
            pending = torch.cat([h.new_zeros(h.shape[0], -start, h.shape[2]), pending], dim=1)
        closed = {j: u[:, j * g : (j + 1) * g] for j in (n_c - 2, n_c - 1) if j >= 0}
        return LevelCache([(k[:, :, :n_c], v[:, :, :n_c]) for k, v in kv], pending, closed)

    # ---- one new token (docs/MODEL.md 6) ----
    def step(self, h: torch.Tensor, embeddings: torch.Tensor, i: int, caches: List[LevelCache]) -> torch.Tensor:
        """h: [b, 1, d] loop input of the token at position i, embeddings [b, 1, d] its raw
        embedding; updates `caches` in place. The topology is per token: no cache needed."""
        state = self.init(h, embeddings)
        for t in range(len(self.chunk_sizes)):
            state = self.write(state, self.step_iteration(t, state[0], i, caches[t]), t)
        return state[0]

    def step_iteration(self, t: int, h: torch.Tensor, i: int, cache: LevelCache) -> torch.Tensor:
        g, w, s = self.chunk_sizes[t], self.offsets[t], self.shifts[t]
        cache.pending = torch.cat([cache.pending, h], dim=1)  # [b, <= g, d]
        j, slot = divmod(i + w, g)  # the token's chunk and slot in x-space
        if slot == g - 1:  # the token closes chunk j: run the core on one new latent
            chunk = cache.pending  # [b, g, d]
            z = self.downscale(t, chunk[:, None], first_pad=w if j == 0 else 0) if g > 1 else chunk  # [b, 1, d]
            angles = self.latent_angles(t, torch.tensor([j], device=h.device))
            y, cache.kv = self.core(z, angles, cache.kv)  # [b, 1, d]
            cache.closed[j] = self.upscale(t, y, y - z) if g > 1 else y - z  # [b, g, d]
            cache.closed.pop(j - 2, None)
            cache.pending = chunk[:, :0]
        m = i - (s - w)  # the x-space index whose update this token receives
        if m < 0:
            return torch.zeros_like(h)
        jm, km = divmod(m, g)
        return cache.closed[jm][:, km : km + 1]  # [b, 1, d]
