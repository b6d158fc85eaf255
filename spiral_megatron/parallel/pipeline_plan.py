"""Pipeline partition of the unrolled program (pure Python: no torch.distributed).

The program is  prelude layer 0..N_pre-1, loop iteration 0..T-1, coda layer 0..N_post-1,
each a unit of work whose forward cost follows docs/MODEL.md section 5 (a loop iteration at chunk
size g costs N_loop layers at length L/g, so coarse iterations are cheap); the output layer
is charged to the last stage. Stages take contiguous runs of units. By default the runs
minimise the most expensive stage ("loop across stages"); `loop_placement="one-stage"` keeps
the whole loop in one unit; `pipeline_split` gives the number of units per stage explicitly.
Every stage that runs at least one iteration holds a replica of the shared core.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from spiral_megatron.config import flops, schedule
from spiral_megatron.errors import ConfigError

PARTS = ("prelude", "loop", "coda")
PLACEMENTS = ("across", "one-stage")


@dataclass(frozen=True)
class Unit:
    """Layers (prelude, coda) or iterations (loop) [start, stop) of one part."""

    part: str
    start: int
    stop: int

    def __str__(self):
        name = {"prelude": "prelude layer", "loop": "iteration", "coda": "coda layer"}[self.part]
        return f"{name} {self.start}" if self.stop == self.start + 1 else f"{name}s {self.start}-{self.stop - 1}"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage's units and estimated forward cost (FLOPs per sequence)."""

    units: Tuple[Unit, ...]
    cost: float

    def span(self, part: str) -> range:
        """Indices of `part` (layers or iterations) this stage runs; empty if none."""
        mine = [u for u in self.units if u.part == part]
        return range(mine[0].start, mine[-1].stop) if mine else range(0)

    def __str__(self):
        return ", ".join(map(str, self.units)) or "(output layer only)"


def program(config, loop_placement: str = "across") -> Tuple[Unit, ...]:
    """The unrolled program as units, in execution order."""
    units = [Unit("prelude", i, i + 1) for i in range(config.num_prelude_layers)]
    T = len(config.chunk_sizes)
    if T and loop_placement == "one-stage":
        units.append(Unit("loop", 0, T))
    else:
        units += [Unit("loop", t, t + 1) for t in range(T)]
    units += [Unit("coda", i, i + 1) for i in range(config.num_coda_layers)]
    return tuple(units)


def unit_cost(config, unit: Unit, seq_length: int) -> float:
    """Forward FLOPs of a unit for one sequence."""
    if unit.part != "loop":
        return (unit.stop - unit.start) * flops.layer_flops(config, seq_length)
    levels = config.levels[unit.start : unit.stop]
    return sum(config.num_core_layers * flops.layer_flops(config, schedule.latent_length(seq_length, lv))
               for lv in levels)


def _balanced_split(costs: Sequence[float], stages: int, tail: float) -> Tuple[int, ...]:
    """Units per stage minimising the most expensive stage (the last one also pays `tail`)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: least max-cost of putting the first i units on s stages; cut[s][i]: its last cut
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                stage = prefix[i] - prefix[j] + (tail if s == stages and i == n else 0.0)
                value = max(best[s - 1][j], stage)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    sizes, i = [], n
    for s in range(stages, 0, -1):
        sizes.append(i - cut[s][i])
        i = cut[s][i]
    return tuple(reversed(sizes))


def plan(
    config,
    seq_length: int,
    vocab_size: int,
    pipeline_parallel: int,
    loop_placement: str = "across",
    split: Optional[Sequence[int]] = None,
) -> Tuple[Stage, ...]:
    """The stages of a pipeline of `pipeline_parallel` ranks; errors name the numbers."""
    if loop_placement not in PLACEMENTS:
        raise ConfigError(f"loop placement {loop_placement!r} must be one of {PLACEMENTS}")
    units = program(config, loop_placement)
    if pipeline_parallel > len(units):
        raise ConfigError(
            f"pipeline_model_parallel_size {pipeline_parallel} is more than the {len(units)} units of "
            f"work ({', '.join(map(str, units))}): every stage needs at least one"
        )
    costs = [unit_cost(config, u, seq_length) for u in units]
    head = 2 * seq_length * config.hidden_size * vocab_size
    if split is None:
        split = _balanced_split(costs, pipeline_parallel, head)
    split = tuple(split)
    if len(split) != pipeline_parallel or sum(split) != len(units) or min(split) < 1:
        raise ConfigError(
            f"pipeline split {split} must give each of the {pipeline_parallel} stages at least one of "
            f"the {len(units)} units ({', '.join(map(str, units))}), {len(units)} in all"
        )
    stages, start = [], 0
    for s, size in enumerate(split):
        tail = head if s == pipeline_parallel - 1 else 0.0
        stages.append(Stage(units[start : start + size], sum(costs[start : start + size]) + tail))
        start += size
    return tuple(stages)


def describe(stages: Sequence[Stage]) -> str:
    """One line per stage: its units and estimated share of the forward cost."""
    total = sum(s.cost for s in stages)
    return "\n".join(f"stage {i}: {s} (est. {s.cost / 1e9:.2f} GFLOP/seq fwd, {100 * s.cost / total:.0f}%)"
                     for i, s in enumerate(stages))
