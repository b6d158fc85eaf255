"""The queue through which Megatron's checkpoint writer reports what it wrote.

dist_checkpointing's writer (both releases) puts its results on a module-wide queue that its
getter creates at the first save: a queue served by a `spawn`ed manager process, reused after.
That manager is a Python of its own that imports torch to read the results (about 3 s of CPU
and 270 MB per rank), and it is only needed when the writer runs in another process, as a
background save's does (`--async-save`). A synchronous save writes in this process (its write
workers, on 0.16, are forked by it and report to it), so a plain queue of this process serves it.

`for_saves` is the job's choice, made once before its SIGTERM handler: `in_this_process` sets
that plain queue (also for the one-process tools, which only save synchronously);
`start_manager` starts the manager now, for background saves, with SIGTERM ignored in it: a SIGTERM sent to the whole process group (SLURM
preemption, `scancel`, torchrun's agent) killed it, and the exit save then failed with
BrokenPipeError. A spawned child inherits an ignored signal.
"""

import queue
import signal


def _module():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return filesystem_async


def for_saves(background: bool) -> None:
    """The job's queue: Megatron's manager for background saves (`--async-save`), else one of
    this process."""
    if background:
        start_manager()
    else:
        in_this_process()


def in_this_process(replace: bool = True) -> None:
    """Megatron's writer reports to a queue of this process (both releases' getters return the
    module's `_results_queue` once it is set). replace=False keeps a queue already set (a
    manager started for background saves)."""
    writer = _module()
    if replace or writer._results_queue is None:
        writer._results_queue = queue.Queue()


def start_manager() -> None:
    """Start Megatron's own queue, served by its manager process, with SIGTERM ignored in it
    (in place of a queue of this process set before: a background writer could not reach it)."""
    writer = _module()
    if isinstance(writer._results_queue, queue.Queue):
        writer._results_queue = None
    start = getattr(writer, "get_write_results_queue", None)  # megatron-core >= 0.17
    start = start or getattr(writer, "_get_write_results_queue")  # 0.16
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        start()
    finally:
        signal.signal(signal.SIGTERM, previous)
