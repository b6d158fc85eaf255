"""SpiralCache: what decoding keeps, as a `transformers.Cache` (docs/MODEL.md section 6, docs/HF.md).

`generate` passes it as `cache` (`past_key_values` before transformers 5.25) and reorders
(beam search), crops (assisted and prompt-lookup decoding), selects and repeats it through the
`Cache` API, like any model's. Its `layers`, in the order the model runs them:
    DynamicLayer x num_prelude_layers    keys/values of every token (transformers' own layer)
    LevelLayer   x len(chunk_sizes)      one loop level: the core's latent keys/values and more
    DynamicLayer x num_coda_layers
A batch that started left-padded decodes as one batch, each row at its own positions (its chunks
count from its own first real token): the cache then holds `lengths`, each row's real tokens,
and every tensor keeps row r's entries at the row's own positions 0 .. lengths[r] - 1 (its
batched prefill left them there, see modeling_spiral.py), with unused entries after them that no
row reads. `write_at` and `read_at` address them per row.

Crop is exact to any length: a level keeps, besides the core's keys/values of its closed chunks,
the input of every token it has seen and the (unshifted) token updates of every closed chunk, so
cutting back to n tokens is slicing every tensor to what n tokens had produced; nothing is
recomputed. That costs 2 x tokens x hidden_size numbers per level and row, about what one layer's
keys and values cost.
"""

from typing import List, Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

try:  # a converted model folder: the copy beside this file
    from . import functional_spiral as F
    from .functional_spiral import SHIFTS  # noqa: F401 (a `from .x import` line: transformers copies x.py)
except ImportError:  # the spiral_megatron package, where it lives one level up
    from spiral_megatron import functional_spiral as F


def row_columns(starts: List[int], k: int, ndim: int, dim: int, device) -> torch.Tensor:
    """Columns starts[r] .. starts[r] + k - 1 of each row r, as [b, 1.., k, 1..]: along `dim` of
    an `ndim`-dimensional tensor (positions of each row's tokens, indices into a cached tensor)."""
    cols = torch.tensor(starts, device=device)[:, None] + torch.arange(k, device=device)  # [b, k]
    return cols.view(cols.shape[:1] + (1,) * (dim - 1) + (k,) + (1,) * (ndim - dim - 1))


def write_at(buffer: Optional[torch.Tensor], x: torch.Tensor, starts: List[int], dim: int) -> torch.Tensor:
    """buffer with x's k entries along `dim` written at each row's own columns starts[r] ..
    starts[r] + k - 1, grown with zeros to fit. A new tensor, as transformers' own layers make
    (their cat): a cached tensor is never written into. x: [b, .., k, ..] like buffer."""
    width = 0 if buffer is None else buffer.shape[dim]
    if all(s == width for s in starts):  # every row appends: what a uniform batch does
        return x if buffer is None else torch.cat([buffer, x], dim=dim)
    need = max(starts) + x.shape[dim]
    if need > width:
        grow = list(x.shape)
        grow[dim] = need - width
        buffer = x.new_zeros(grow) if buffer is None else torch.cat([buffer, buffer.new_zeros(grow)], dim=dim)
    return buffer.scatter(dim, row_columns(starts, x.shape[dim], x.dim(), dim, x.device).expand(x.shape), x)


def read_at(buffer: torch.Tensor, starts: List[int], k: int, dim: int) -> torch.Tensor:
    """Each row's k entries along `dim` from its own column starts[r]: [b, .., k, ..]; zeros at
    columns before 0 (a chunk's front padding, the shift's zeros) or past the buffer's end.
    Rows alike: a slice, padded with those zeros."""
    width = buffer.shape[dim]
    if all(s == starts[0] for s in starts):
        start = starts[0]
        x = buffer.narrow(dim, min(max(start, 0), width), max(min(start + k, width) - max(start, 0), 0))
        front = min(max(-start, 0), k)
        back = k - front - x.shape[dim]
        return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [front, back]) if front or back else x
    shape = list(buffer.shape)
    shape[dim] = k
    if width == 0:
        return buffer.new_zeros(shape)
    cols = row_columns(starts, k, buffer.dim(), dim, buffer.device)
    x = buffer.gather(dim, cols.clamp(0, width - 1).expand(shape))
    return torch.where((cols >= 0) & (cols < width), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _select(x: Optional[torch.Tensor], index: torch.Tensor) -> Optional[torch.Tensor]:
    return None if x is None else x.index_select(0, index.to(x.device))


def _rows_of(layer: DynamicLayer, change) -> None:
    """change(keys or values) -> new rows, for a core layer that has its batch shape: also when
    it holds no latent yet (cut back to none), which transformers' own reorder and repeat skip,
    leaving its batch size stale for the next chunk's keys."""
    if layer.is_initialized and layer.keys.dim() > 1:
        layer.keys, layer.values = change(layer.keys), change(layer.values)


class LevelLayer:
    """Loop level t after `seen` tokens (batch-first tensors; with SpiralCache.lengths, row r's
    entries at its own positions, `seen` the widest):
        core     one DynamicLayer per core layer: latent keys/values, one per closed chunk
        inputs   [b, seen, d]      the level's input h of every token (the open chunk is read here)
        updates  [b, n_c * g, d]   the token update of every closed chunk, before its shift (x-space)
    n_c = functional_spiral.closed_chunks(seen, g, w)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, chunk_size: int, offset: int, num_core_layers: int):
        self.chunk_size, self.offset = chunk_size, offset
        self.core = [DynamicLayer() for _ in range(num_core_layers)]
        self.inputs: Optional[torch.Tensor] = None
        self.updates: Optional[torch.Tensor] = None
        self.seen = 0

    @property
    def is_initialized(self) -> bool:
        return self.inputs is not None

    def closed(self, num_tokens: Optional[int] = None) -> int:
        return F.closed_chunks(self.seen if num_tokens is None else num_tokens, self.chunk_size, self.offset)

    # ---- filled by the loop ----
    def fill(self, inputs: torch.Tensor, updates: torch.Tensor) -> None:
        """After a full forward over L tokens: their inputs [b, L, d] and the updates [b, >= n_c*g, d]
        of the chunks (x-space); the core's layers already hold every latent's keys/values, and
        those of chunks still open (or of padding) are dropped here."""
        self.inputs, self.seen = inputs, inputs.shape[1]
        n_c = self.closed()
        self.updates = updates[:, : n_c * self.chunk_size]
        for layer in self.core:
            if layer.get_seq_length() > n_c:
                layer.crop(n_c - layer.get_seq_length())

    def append(self, h: torch.Tensor, starts: List[int]) -> None:
        """The inputs h [b, n, d] of each row's next n tokens, row r's from position starts[r]."""
        self.inputs = write_at(self.inputs, h, starts, dim=1)
        self.seen = self.inputs.shape[1]

    def chunk_inputs(self, firsts: List[int], k: int) -> torch.Tensor:
        """The inputs [b, k * g, d] of each row's chunks firsts[r] .. firsts[r] + k - 1, front
        padding as zeros."""
        starts = [F.chunk_tokens(j, self.chunk_size, self.offset)[0] for j in firsts]
        return read_at(self.inputs, starts, k * self.chunk_size, dim=1)

    def close(self, u: torch.Tensor, firsts: List[int]) -> None:
        """The token updates u [b, k * g, d] of each row's chunks firsts[r] .. firsts[r] + k - 1."""
        self.updates = write_at(self.updates, u, [j * self.chunk_size for j in firsts], dim=1)

    def updates_at(self, starts: List[int], n: int) -> torch.Tensor:
        """Each row's updates [b, n, d] at x-positions starts[r] .. starts[r] + n - 1, zeros before
        the first (the shift's)."""
        return read_at(self.updates, starts, n, dim=1)

    # ---- the Cache layer API ----
    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Keep what the first seen - |tokens_to_remove| tokens produced (transformers' convention:
        a negative count removes that many tokens)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        n = max(self.seen + tokens_to_remove, 0)
        if n == self.seen:
            return
        n_c = self.closed(n)
        for layer in self.core:
            layer.crop(n_c - layer.get_seq_length()) if layer.get_seq_length() > n_c else None
        self.inputs = self.inputs[:, :n]
        self.updates = None if self.updates is None else self.updates[:, : n_c * self.chunk_size]
        self.seen = n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.core:
            _rows_of(layer, lambda x: _select(x, indices))
        self.inputs, self.updates = _select(self.inputs, indices), _select(self.updates, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rep = lambda x: None if x is None else x.repeat_interleave(repeats, dim=0)  # noqa: E731
        for layer in self.core:
            _rows_of(layer, rep)
        self.inputs, self.updates = rep(self.inputs), rep(self.updates)

    def reset(self) -> None:
        for layer in self.core:
            layer.reset()
        self.inputs = self.updates = None
        self.seen = 0


class SpiralCache(Cache):
    """The decoding state of a SpiralForCausalLM (module docstring). Build it with the model's
    config, empty; the model fills it (`generate` makes one when `use_cache`)."""

    def __init__(self, config):
        self.config = config
        prelude = [DynamicLayer() for _ in range(config.num_prelude_layers)]
        levels = [LevelLayer(g, w, config.num_core_layers) for g, w in zip(config.chunk_sizes, config.offsets)]
        coda = [DynamicLayer() for _ in range(config.num_coda_layers)]
        super().__init__(layers=prelude + levels + coda)
        self.lengths: Optional[List[int]] = None  # a batch that started left-padded: each row's real tokens
        self.seen = 0  # tokens (columns of the batch) seen

    @property
    def prelude(self) -> list:
        return self.layers[: self.config.num_prelude_layers]

    @property
    def levels(self) -> List[LevelLayer]:
        n = self.config.num_prelude_layers
        return self.layers[n : n + len(self.config.chunk_sizes)]

    @property
    def coda(self) -> list:
        return self.layers[self.config.num_prelude_layers + len(self.config.chunk_sizes) :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def crop(self, tokens_to_remove: int) -> None:
        """Keep what each row's first tokens produced, all but its last |tokens_to_remove|. With
        `lengths` only they change: every entry is at its row's own position, and those past a
        row's length are not read."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        self.seen = max(self.seen + tokens_to_remove, 0)
        if self.lengths is None:
            super().crop(tokens_to_remove)
        elif self.seen == 0:
            self.reset()
        else:
            self.lengths = [max(n + tokens_to_remove, 0) for n in self.lengths]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.lengths is not None:
            self.lengths = [self.lengths[i] for i in indices.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.lengths is not None:
            self.lengths = [n for n in self.lengths for _ in range(repeats)]

    def reset(self) -> None:
        super().reset()
        self.lengths, self.seen = None, 0
