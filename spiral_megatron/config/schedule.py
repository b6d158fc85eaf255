"""The resolution schedule (docs/MODEL.md section 2): no model, no distributed.

One `Level` per loop iteration t: its chunk size g_t, chunk offset w_t and causal right
shift s_t. Everything derived from the schedule (latent lengths, layout checks, the relative
cost of the core) lives here, so it can be planned and tested without building a model. The
rules themselves (validation, shift, padding) are `functional_spiral.py`'s, which the
Hugging Face configuration uses too.
"""

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

from spiral_megatron import functional_spiral
from spiral_megatron.errors import ConfigError
from spiral_megatron.functional_spiral import SHIFTS  # noqa: F401  (re-exported for the config)


@dataclass(frozen=True)
class Level:
    """One loop iteration's resolution."""

    chunk_size: int
    """g_t: tokens per latent; the core runs over L / g_t latents."""

    offset: int
    """w_t in [0, g_t): chunk j holds tokens [j*g - w, j*g + g - 1 - w] (front padded)."""

    shift: int
    """s_t: right shift of the token-level update; g - 1 (overlap, paper) or g (no-overlap)."""

    @property
    def ratio(self) -> float:
        """r_t = 1 / g_t, the fraction of the sequence the core sees."""
        return 1.0 / self.chunk_size


def depth_text(num_prelude: int, num_core: int, chunk_sizes: Sequence[int], num_coda: int) -> str:
    """`1 prelude + 2 core x 4 loops (chunk sizes 8,4,2,1) + 1 coda`; `N layers` without a loop."""
    if not chunk_sizes:
        return f"{num_prelude + num_core + num_coda} layers"
    return (f"{num_prelude} prelude + {num_core} core x {len(chunk_sizes)} loops "
            f"(chunk sizes {','.join(map(str, chunk_sizes))}) + {num_coda} coda")


def parse_ints(value: Union[str, int, Sequence[int]], what: str = "chunk sizes") -> Tuple[int, ...]:
    """"8,4,2,1", 8 or [8, 4, 2, 1] -> a tuple of ints. Empty string -> ()."""
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip("()[] ").split(",") if p.strip()]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"{what} {value!r} must be comma-separated integers") from None
    return tuple(int(g) for g in value)


def parse_chunk_sizes(value: Union[str, Sequence[int]]) -> Tuple[int, ...]:
    """"8,4,2,1" or [8, 4, 2, 1] -> (8, 4, 2, 1). Empty string -> ()."""
    return parse_ints(value, "chunk sizes")


def make_levels(
    chunk_sizes: Sequence[int], offsets: Sequence[int] = None, shift: str = "overlap"
) -> Tuple[Level, ...]:
    """The schedule's levels, validated; errors name the bad value and the rule."""
    chunk_sizes = parse_chunk_sizes(chunk_sizes)
    offsets = tuple(offsets) if offsets is not None else (0,) * len(chunk_sizes)
    try:  # the rules are functional_spiral's (shipped with the HF model, which raises ValueError)
        functional_spiral.check_schedule(chunk_sizes, offsets, shift)
    except ValueError as e:  # a refusal: check_schedule only validates
        raise ConfigError(str(e)) from None
    return tuple(Level(chunk_size=g, offset=w, shift=functional_spiral.shift_of(g, shift))
                 for g, w in zip(chunk_sizes, offsets))


def padding_multiple(levels: Sequence[Level]) -> int:
    """The loop pads the sequence (at its end) to a multiple of every chunk size."""
    return functional_spiral.padding_multiple([lv.chunk_size for lv in levels])


def padded_length(seq_length: int, levels: Sequence[Level]) -> int:
    """L rounded up to `padding_multiple` (functional_spiral.padded_length)."""
    return functional_spiral.padded_length(seq_length, [lv.chunk_size for lv in levels])


def latent_length(seq_length: int, level: Level) -> int:
    """L_t: latents the core sees at this level for a (padded) length."""
    return padded_length(seq_length, [level]) // level.chunk_size


def relative_core_cost(levels: Sequence[Level]) -> float:
    """sum_t r_t: the core's projection cost in units of one full-resolution pass."""
    return sum(lv.ratio for lv in levels)


def check_sequence_layout(
    seq_length: int, levels: Sequence[Level], tensor_parallel: int = 1, sequence_parallel: bool = False,
    context_parallel: int = 1,
) -> None:
    """Refuse a (sequence, parallel layout) the loop cannot run, naming the numbers.

    Without sequence parallelism any length works (the loop pads). With it, each rank's slice
    L/tp must be a multiple of every chunk size, so chunking stays local to the rank.
    """
    if seq_length < 1:
        raise ConfigError(f"seq_length {seq_length} must be >= 1")
    if context_parallel != 1 and levels:
        raise ConfigError(
            f"context_parallel_size {context_parallel} is not supported by the loop yet; use 1"
        )
    if not sequence_parallel or tensor_parallel == 1:
        return
    if seq_length % tensor_parallel:
        raise ConfigError(
            f"seq_length {seq_length} is not a multiple of tensor_model_parallel_size "
            f"{tensor_parallel} (sequence parallelism splits the sequence over TP ranks)"
        )
    local = seq_length // tensor_parallel
    for lv in levels:
        if local % lv.chunk_size:
            raise ConfigError(
                f"seq_length/tp = {seq_length}/{tensor_parallel} = {local} is not a multiple of "
                f"chunk size {lv.chunk_size}: with sequence parallelism each rank's slice must "
                f"hold whole chunks"
            )
