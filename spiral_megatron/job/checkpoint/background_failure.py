"""A save whose writer failed, as one line on every rank (issue 21, item 9).

Megatron's forked writer (`--async-save`) cannot end the job itself: it records its error in
the write results, and megatron-core raises CheckpointException on every rank when that save is
finalized, that is once every rank's writer of it has ended (each rank's process state is
agreed in an all-reduce at each step's `maybe_finalize_async_calls`). A synchronous save runs
its writers as workers too and raises the same at its end, in every rank. Only the coordinator
(rank 0) holds the failures; the others get `CheckpointException ranks:dict_keys([])`. So the
coordinator's description is broadcast (every rank is in this same except clause, after
Megatron's own broadcast), and every rank raises the same SaveFailed: rank 0 prints it and
every rank records it for torchrun, whichever torchrun names as the root cause.
"""

import torch.distributed as dist


def describe(error) -> str:
    """`error`'s failures (a CheckpointException's {rank: exception or (exception, traceback)})."""
    failures = getattr(error, "failures", None) or {}
    parts = []
    for rank, failure in sorted(failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        parts.append(f"rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return "; ".join(parts)


def translated(error, what: str, latest: str, save_failed: type) -> Exception:
    """The SaveFailed for `error`, raised while finalizing the save `what` ("the background save
    of FOLDER", "saving iteration N to ROOT"; `latest`: what the last complete checkpoint is),
    the same on every rank."""
    said = [describe(error)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(said, src=0)  # Megatron's coordinator: rank 0 of the save's group
    line = (f"{what} failed ({said[0] or 'no rank said why'}); "
            f"the last complete checkpoint is still the latest: {latest}")
    failed = save_failed(line)
    failed.every_rank = True  # examples/pretrain_spiral.py: rank 0 prints it, every rank records it
    return failed
