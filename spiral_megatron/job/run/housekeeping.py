"""Megatron-LM's --manual-gc and --empty-unused-memory-level: Python's garbage collection and
the CUDA caching allocator's unused blocks, released at known points of the run.

A collection of Python's cyclic garbage collector stops the process for as long as it takes,
at moments each rank picks on its own; at scale one rank's pause holds up every collective.
With `manual_gc` the automatic collector is off while the job trains, and every rank collects
at the same points instead (Megatron-LM's training.py): at the start, every
`manual_gc_interval` steps, and before and after each evaluation (`manual_gc_eval`).
"""

import gc

import torch


class ManualGC:
    """Collections at known points while the run trains (a context: automatic collection is
    restored on exit, for a caller that goes on in the same process)."""

    def __init__(self, enabled: bool, interval: int = 0, around_eval: bool = True):
        self.enabled, self.interval, self.around_eval = enabled, interval, around_eval
        self.was_enabled = True

    def __enter__(self) -> "ManualGC":
        self.was_enabled = gc.isenabled()
        if self.enabled:
            gc.disable()
            gc.collect()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.was_enabled:
            gc.enable()

    def after_step(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def evaluation(self) -> None:
        """Before and after an evaluation."""
        if self.enabled and self.around_eval:
            gc.collect()


def release_unused_memory(level: int, needed: int) -> None:
    """Return the caching allocator's unused blocks to the device when `level` (the job's
    empty_unused_memory_level) is at least `needed`: 1 after a step's forward-backward and an
    evaluation's batches, 2 also after the optimizer step (Megatron-LM's points)."""
    if level >= needed and torch.cuda.is_available():
        torch.cuda.empty_cache()
