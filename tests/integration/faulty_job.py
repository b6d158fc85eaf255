"""Test-only: examples/pretrain_spiral.py with one fault planted, chosen by SPIRAL_TEST_FAULT
(tests/integration/test_crash.py, test_torchrun_exits.py). The job itself has no fault hook.

    pause:startup          stop (SIGSTOP) once config.yaml is written, before the first step
    pause:save[:N]         stop inside the N-th save (default 1): shards written into the staging
                           folder, no side files and no marker yet
    pause:background-save  stop once a background save is scheduled (its writer runs on)
    pause:teardown         stop after the last save, before the lock is released
    raise:step:RANK:N      RuntimeError on RANK in its N-th training step
    raise:save:RANK        RuntimeError on RANK as the save starts writing (the others are in its
                           collectives)
    raise:writer:RANK      RuntimeError in RANK's checkpoint writer (with --async-save: Megatron's
                           forked writer process), as a disk error would
    full:log-json:N        the N-th write to --log-json fails as on a full disk (OSError ENOSPC)

A stopped job is then killed whole by the test (tools/crash_test.kill_job), as a scheduler does.
"""

import functools
import importlib.util
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def around(owner, name: str, before=None, after=None) -> None:
    """Replace `owner.name` by a wrapper calling `before(*args)` / `after(*args)` around it."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if before:
            before(*args)
        result = original(*args, **kwargs)
        if after:
            after(*args)
        return result

    setattr(owner, name, wrapper)


def pause(*_):
    os.kill(os.getpid(), signal.SIGSTOP)


def plant(fault: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from spiral_megatron.job.checkpoint import checkpointing, folder_lock
    from spiral_megatron.job.run import console, step

    kind, where, *rest = fault.split(":")
    rank = int(os.environ.get("RANK", "0"))
    if kind == "full":  # full:log-json:N
        import errno
        import json

        from spiral_megatron.job.run import metrics

        writes = []

        class FullDisk:  # metrics' json module: the N-th record's write fails
            def dumps(self, record):
                writes.append(1)
                if len(writes) == int(rest[0]):
                    raise OSError(errno.ENOSPC, "No space left on device")
                return json.dumps(record)

        metrics.json = FullDisk()
        return
    if fault == "pause:startup":
        around(console, "write_config", after=pause)
    elif kind == "pause" and where == "save":  # pause:save:N stops in the N-th save (default 1)
        saves = []
        around(dist_checkpointing, "save", after=lambda *_: saves.append(1) or (
            len(saves) == int((rest or ["1"])[0]) and pause()))
    elif fault == "pause:background-save":
        around(checkpointing.BackgroundSaves, "schedule", after=pause)
    elif fault == "pause:teardown":
        around(folder_lock.FolderLock, "release", before=pause)
    elif kind == "raise" and int(rest[0]) == rank:
        calls = []

        def fail(*_):
            calls.append(1)
            if where != "step" or len(calls) == int(rest[1]):
                raise RuntimeError(f"injected fault: rank {rank}, {where}")

        owner, name = {"step": (step, "train_step"), "save": (dist_checkpointing, "save"),
                       "writer": (filesystem_async, "_write_item")}[where]
        around(owner, name, before=fail)


if __name__ == "__mp_main__":  # a spawned helper (Megatron's checkpoint writer) ends with its rank
    from spiral_megatron.job.run.parent_watch import exit_with_parent

    exit_with_parent()


if __name__ == "__main__":  # dist_checkpointing's save helper re-imports this module
    spec = importlib.util.spec_from_file_location("pretrain_spiral", ROOT / "examples" / "pretrain_spiral.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    plant(os.environ["SPIRAL_TEST_FAULT"])

    from spiral_megatron.job.run import fatal

    fatal.run(job.main, sys.argv[1:])
