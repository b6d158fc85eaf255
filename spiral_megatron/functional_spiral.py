"""The loop's math, the one source for the Megatron model and the Hugging Face model.

docs/MODEL.md sections 2-3: the schedule's rules, one loop iteration (shift, down-scale, core,
up-scale, shift back) and the topologies (residual, anchor, MeSH with its transitional step).
Plain functions over tensors, no parameters: each side owns its weights (Megatron's
ReplicatedLinear, torch's nn.Linear) and passes them, or callables over them, in. Every function
that touches the sequence takes its dimension `dim` explicitly: 0 for Megatron's [s, b, h], 1
for Hugging Face's [b, s, d]. Imports only torch, the standard library and its sibling
`functional_autograd.py`: the converter copies both into every Hugging Face folder, where the
model files import them relatively.

Written for a launch-bound GPU (issues 15, 23): the shift back is a view of the up-scale's
output here (one pad of it in eager mode, `functional_autograd.Allocate`), sqrt(g) scales the
small allocation weights, not the token update, and MeSH keeps its slots as one row per token
([N, B, h]) so that a write is one fused multiply-add and a read one batched matrix-vector
product, each touching the B slots once. The learned steps
(self-aggregation, allocation, the MeSH write-read) take their weights, not the outputs of
their linears: in eager mode each runs as one autograd node with its linear inside and its
backward written out (`functional_autograd.py`); under torch.compile the formulas here run.
"""

import math
from typing import Callable, Optional, Sequence, Tuple

import torch

from .functional_autograd import Aggregate, Allocate, MeshStep  # a `from .x import` line: transformers copies x.py

# The options' names, one list each: SpiralConfig and the Hugging Face config both check against these.
SHIFTS = ("overlap", "no-overlap")
TOPOLOGIES = ("residual", "anchor", "mesh")
DOWNSCALES = ("self-aggregation", "mean")
UPSCALES = ("allocate", "repeat")
LATENT_POSITIONS = ("chunk-end", "index")
State = Tuple[torch.Tensor, ...]


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


def padded_length(length: int, chunk_sizes: Sequence[int]) -> int:
    """L rounded up to `padding_multiple`: the length the loop runs at. The padding is after
    every real token, so causality keeps it from touching them (docs/MODEL.md section 2)."""
    m = padding_multiple(chunk_sizes)
    return -(-length // m) * m


def pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """x with zeros appended along `dim` up to `length` (the loop's end padding)."""
    pad = length - x.shape[dim]
    if not pad:
        return x
    return torch.cat([x, x.new_zeros(x.shape[:dim] + (pad,) + x.shape[dim + 1 :])], dim=dim)


def crop_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """The first `length` entries of `dim`: the loop's output without its end padding (a view)."""
    return x if x.shape[dim] == length else x.narrow(dim, 0, length)


# ---- where a token sits in iteration t's layout (`iteration` below; decoding reads them per token) ----
def token_chunk(i: int, chunk_size: int, offset: int) -> Tuple[int, int]:
    """(j, k): token i is slot k of chunk j, since x = shift_right(h, w) puts h[i] at x[i + w]."""
    return divmod(i + offset, chunk_size)


def chunk_tokens(j: int, chunk_size: int, offset: int) -> Tuple[int, int]:
    """[start, stop) of the tokens in chunk j: x[j*g : j*g + g] = h[j*g - w : j*g + g - w]; a
    negative start is front padding (chunk 0 only, w slots)."""
    start = j * chunk_size - offset
    return start, start + chunk_size


def closed_chunks(num_tokens: int, chunk_size: int, offset: int) -> int:
    """Chunks whose last token is among the first `num_tokens` ones (the core has run on them)."""
    return (num_tokens + offset) // chunk_size


def update_delay(shift: int, offset: int) -> int:
    """How far right the up-scaled update u, laid out like x, moves onto tokens: s - w. Token i
    receives u[i - (s - w)] (zero before u starts), the newest chunk closed at or before it."""
    return shift - offset


def latent_positions(j: torch.Tensor, chunk_size: int, offset: int, mode: str) -> torch.Tensor:
    """Rotary position of latents j: their chunk's last token j*g + g - 1 - w ("chunk-end",
    [ours]) or the latent index j ("index")."""
    return j * chunk_size + (chunk_size - 1 - offset) if mode == "chunk-end" else j


def latent_slice(n: int, chunk_size: int, offset: int, mode: str) -> slice:
    """`latent_positions` of latents 0..n-1 as a slice of the token positions: a table of
    per-token rotary frequencies indexed with it is a view, not a gather."""
    start = chunk_size - 1 - offset if mode == "chunk-end" else 0
    step = chunk_size if mode == "chunk-end" else 1
    return slice(start, start + (n - 1) * step + 1, step)


# ---- resampling (docs/MODEL.md section 3, steps 1, 3 and 4) ----
def softmax_fp32(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax computed in float32, returned in the input's dtype (bf16/fp16 safe)."""
    return torch.softmax(scores, dim=dim, dtype=torch.float32).to(scores.dtype)


def shift_right(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """out[i] = x[i - k] along `dim`, zeros for i < k (the causal shift, one process): one pad
    that adds k zeros in front and drops k entries at the end."""
    if k == 0:
        return x
    if k >= x.shape[dim]:
        return torch.zeros_like(x)
    return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [k, -k])


def _pad_front(x: torch.Tensor, dim: int) -> torch.Tensor:
    """One zero entry in front of `dim` (one latent, or one chunk)."""
    return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [1, 0])


def chunk(x: torch.Tensor, g: int, dim: int) -> torch.Tensor:
    """Split `dim` (length a multiple of g) into (chunk j, slot k): [.., n, g, ..]."""
    return torch.unflatten(x, dim, (x.shape[dim] // g, g))


def aggregate(chunks: torch.Tensor, weight, first_pad: int, dim: int) -> torch.Tensor:
    """One latent per chunk: chunks [.., n, g, .., h] (chunk j at `dim`, slot k at dim + 1).

    weight [1, h] (the scorer A_t): self-aggregation, latent = sum_k softmax_k(x_k A_t^T) x_k;
    or a callable chunks -> scores [.., n, g, .., 1] (the scorer called as a module: PEFT's
    adapters wrap it in the Hugging Face model); None: the mean. The first `first_pad` slots of
    chunk 0 are front padding (zeros from the offset shift) and take no weight in the softmax
    nor a place in the mean [ours]. Eager with a weight runs `functional_autograd.Aggregate`
    (its backward written out); torch.compile and a callable run this formula.
    """
    n, g = chunks.shape[dim], chunks.shape[dim + 1]
    if weight is None:
        z = chunks.mean(dim=dim + 1)  # [.., n, .., h]
        if first_pad:  # padded slots are zero: rescale chunk 0 to the mean of its real tokens
            scale = torch.ones(n, dtype=z.dtype, device=z.device)
            scale[0] = g / (g - first_pad)
            z = z * scale.view(n, *([1] * (z.dim() - dim - 1)))
        return z
    if callable(weight):
        scores = weight(chunks)  # [.., n, g, .., 1]
    elif not torch.compiler.is_compiling():
        return Aggregate.apply(chunks, weight, first_pad, dim)
    else:
        scores = torch.nn.functional.linear(chunks, weight)  # [.., n, g, .., 1]
    if first_pad:
        pad = torch.zeros(n, g, dtype=torch.bool, device=chunks.device)
        pad[0, :first_pad] = True
        scores = scores.masked_fill(pad.view(n, g, *([1] * (scores.dim() - dim - 2))), float("-inf"))
    weights = softmax_fp32(scores, dim=dim + 1)  # [.., n, g, .., 1]
    return (weights * chunks).sum(dim=dim + 1)  # [.., n, .., h]


def allocate(y: torch.Tensor, delta: torch.Tensor, weight, bias: Optional[torch.Tensor],
             dim: int, shift: int = 0) -> torch.Tensor:
    """Latent update delta [.., n, .., h] -> token update [.., n*g, .., h]: slot k of chunk j
    receives sqrt(g) * beta_jk * delta_j, beta_j = softmax(y_j B_t^T + b_t) over the g slots
    (weight B_t [g, h], bias b_t [g]: the allocator, on the core's OUTPUT latent y) [ours: input
    and sqrt(g), so that at uniform beta the chunk's update energy sum_k |u_k|^2 is |delta|^2].

    `shift` (0 <= shift <= g): the result shifted right by it, as a view: the product is
    written with one zero chunk in front, and the shifted update starts `shift` tokens into it.
    weight may instead be a callable y -> logits [.., n, .., g] (the allocator called as a
    module, bias None: PEFT's adapters wrap it in the Hugging Face model). Eager with weights
    runs `functional_autograd.Allocate` (its backward written out); torch.compile and a
    callable run this formula.
    """
    if callable(weight):
        logits = weight(y)  # [.., n, .., g]
    elif not torch.compiler.is_compiling():
        return Allocate.apply(y, delta, weight, bias, dim, shift)
    else:
        logits = torch.nn.functional.linear(y, weight, bias)  # [.., n, .., g]
    g = logits.shape[-1]
    beta = softmax_fp32(logits, dim=-1) * math.sqrt(g)  # [.., n, .., g]: sqrt(g) on the weights
    beta = beta.movedim(-1, dim + 1).unsqueeze(-1)  # [.., n, g, .., 1]
    delta = delta.unsqueeze(dim + 1)  # [.., n, 1, .., h]
    if not shift:
        return (beta * delta).flatten(dim, dim + 1)  # [.., n*g, .., h]
    u = (_pad_front(beta, dim) * _pad_front(delta, dim)).flatten(dim, dim + 1)  # [.., (n+1)*g, .., h]
    return u.narrow(dim, g - shift, u.shape[dim] - g)


def repeat(delta: torch.Tensor, g: int, dim: int, shift: int = 0) -> torch.Tensor:
    """Latent update delta [.., n, .., h] -> every token of chunk j receives delta_j; shifted
    right by `shift` (0 <= shift <= g) as in `allocate`."""
    if not shift:
        return delta.repeat_interleave(g, dim=dim)
    u = _pad_front(delta, dim).repeat_interleave(g, dim=dim)  # [.., (n+1)*g, .., h]
    return u.narrow(dim, g - shift, u.shape[dim] - g)


def iteration(h: torch.Tensor, chunk_size: int, offset: int, shift: int, dim: int,
              core: Callable, downscale: Callable, upscale: Callable,
              first_pad: Optional[int] = None, shift_right_fn: Optional[Callable] = None) -> torch.Tensor:
    """One loop iteration (docs/MODEL.md section 3) on token states h [.., S, .., h]:

        x = shift_right(h, w)        chunk j of x = tokens [j*g - w, j*g + g - 1 - w]
        z = downscale(chunks of x)   [.., S/g, .., h]
        y = core(z)                  causal over the latents, the shared weights
        u = upscale(y, y - z, s - w) the update on tokens, shifted right by s - w

    downscale(chunks, first_pad) -> z; upscale(y, delta, shift) -> u (the `aggregate` and
    `allocate`/`repeat` above, over each side's weights). first_pad: front-padding slots of
    chunk 0 (default w; a sequence-parallel rank after the first has none). shift_right_fn
    (x, k) -> x shifted: a shift that crosses ranks (sequence parallelism); None = this
    process's, fused into the up-scale. Chunk size 1 skips the resampling (an identity).
    """
    g, w, delay = chunk_size, offset, update_delay(shift, offset)
    local = shift_right_fn is None
    shift_fn = (lambda x, k: shift_right(x, k, dim)) if local else shift_right_fn
    x = shift_fn(h, w) if w else h  # [.., S, .., h]
    if g == 1:
        y = core(x)
        return shift_fn(y - x, delay) if delay else y - x
    z = downscale(chunk(x, g, dim), w if first_pad is None else first_pad)  # [.., S/g, .., h]
    y = core(z)  # [.., S/g, .., h]
    if local:
        return upscale(y, y - z, delay)  # [.., S, .., h]
    u = upscale(y, y - z, 0)
    return shift_fn(u, delay) if delay else u


# ---- topologies (docs/MODEL.md section 3, step 5) ----
# A loop state is a tuple of tensors whose first is h, the next iteration's input:
#   residual (h,), anchor (h, h0), mesh (h, slots [.., B, h]).
def mesh_slots(embeddings: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The MeSH buffer before the transitional write, one row per token: slot 0 = the raw token
    embeddings (before the prelude), the other B - 1 slots zeros. -> [N, B, h], N tokens"""
    rows = embeddings.reshape(-1, 1, embeddings.shape[-1])  # [N, 1, h]
    return torch.nn.functional.pad(rows, (0, 0, 0, num_slots - 1))


def mesh_step(slots: torch.Tensor, u: Optional[torch.Tensor], h: torch.Tensor, write_weight: torch.Tensor,
              read_weight: torch.Tensor) -> State:
    """One MeSH write-read (MeSH section 3.2): slots [N, B, h] (a row per token), u [.., h]
    what is written (None: h itself, the transitional step), h [.., h] the state the routers
    read (N tokens); write_weight, read_weight [B, h].
        slot_b += u * softmax_b(W h)        h' = sum_b slot_b * softmax_b(R h)
    Both routers run as one matmul and one softmax. -> (h', slots)

    Eager runs `functional_autograd.MeshStep`, whose backward is written out; under
    torch.compile the plain formula below, from which the compiler derives and fuses its own
    backward (it cannot fuse the written-out one: issue 15's compiled count rose by a quarter
    with it)."""
    if not torch.compiler.is_compiling():
        return MeshStep.apply(slots, u, h, write_weight, read_weight)
    return mesh_step_routed(slots, h if u is None else u,
                            torch.nn.functional.linear(h, torch.cat([write_weight, read_weight])))


def mesh_step_routed(slots: torch.Tensor, u: torch.Tensor, logits: torch.Tensor) -> State:
    """`mesh_step` from the routers' logits [.., 2B] (write, then read), the plain formula with
    autograd's backward: under torch.compile, and for a caller whose routers are modules it
    calls (the Hugging Face model, where PEFT's adapters wrap them). -> (h' [.., h], slots [N, B, h])"""
    B, d = logits.shape[-1] // 2, u.shape[-1]
    w, r = softmax_fp32(logits.reshape(-1, 2, B), dim=-1).unbind(-2)  # [N, B] each
    slots = torch.addcmul(slots, w.unsqueeze(-1), u.reshape(-1, 1, d))  # [N, B, h]
    return torch.matmul(r.unsqueeze(-2), slots).view(u.shape), slots  # [.., h], [N, B, h]


def _mesh(slots: torch.Tensor, u: Optional[torch.Tensor], h: torch.Tensor, routers) -> State:
    """One MeSH write-read (u None: write h); routers: (write_weight, read_weight) [B, h] each,
    or a callable h -> logits [.., 2B] (the routers called as modules)."""
    if callable(routers):
        return mesh_step_routed(slots, h if u is None else u, routers(h))
    return mesh_step(slots, u, h, *routers)


def init_state(topology: str, h0: torch.Tensor, embeddings: Optional[torch.Tensor] = None,
               mesh_weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               num_slots: int = 0) -> State:
    """The loop state from h0, the prelude's output, and the raw token embeddings. MeSH: slot 0
    = the embeddings, then the transitional write-read of h0 with its own router pair
    (mesh_weights = (W_init, R_init), or a callable h -> logits, see `_mesh`) [ours: the
    transitional step writes h0 itself]."""
    if topology == "anchor":
        return (h0, h0)
    if topology == "mesh":
        return _mesh(mesh_slots(embeddings, num_slots), None, h0, mesh_weights)  # writes h0
    return (h0,)


def update_state(topology: str, state: State, u: torch.Tensor,
                 mesh_weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> State:
    """Merge iteration t's token update u into the state: residual h + u [ours], anchor h0 + u
    (the paper's baseline), MeSH write-read with iteration t's routers, which read the state
    h(t) that entered the iteration."""
    if topology == "anchor":
        return (state[1] + u, state[1])
    if topology == "mesh":
        h, slots = state
        return _mesh(slots, u, h, mesh_weights)
    return (state[0] + u,)
