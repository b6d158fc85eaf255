"""How the model's opt-in compiled regions are compiled and run (compile_loop_iteration,
compile_layers; docs/MODEL.md section 9): each region one graph, with no graph break.

Three things would break them otherwise, each measured by tests/unit/test_compile.py (on the
tiny model, compile_loop_iteration alone had 37 graphs and 69 breaks before this module):
- dynamic shapes: the loop calls its compiled step once per level, each at its own latent
  length and level t; dynamo's automatic dynamic shapes would turn t into a symbol after the
  second level and break at `str(t)`. Compiled with static shapes, every level gets its own
  graph (T graphs; with recompute_loop_iterations 2T, the forward under no_grad and the
  backward's replay, within dynamo's recompile limit of 8 per code object for T <= 4).
- warnings: Megatron's linear layers warn "tp_group is None" on every call on rank 0 (0.16
  and 0.19), and dynamo cannot trace `warnings.warn`: a graph break per call. While a compiled
  region runs, dynamo ignores `warnings.warn` [ours]: a warning raised inside a compiled region
  is dropped. The backward's replay under recompute runs the region again, so the setting
  goes with the compiled function, not with the forward that first calls it.
- `Tensor.unflatten` (torch 2.13: dynamo cannot trace its `super().unflatten()`, a break per
  call): functional_spiral calls `torch.unflatten` instead.
"""

import contextlib
import functools
import warnings
from typing import Callable

import torch


def compiled(fn: Callable) -> Callable:
    """`fn` through torch.compile with static shapes, run with `warnings.warn` ignored."""
    graph = torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with tracing(True):
            return graph(*args, **kwargs)

    return run


def tracing(active: bool):
    """The context in which compiled regions run: dynamo ignores `warnings.warn` (see above)."""
    if not active:
        return contextlib.nullcontext()
    ignored = torch._dynamo.config.ignore_logging_functions | {warnings.warn}
    return torch._dynamo.config.patch(ignore_logging_functions=ignored)
