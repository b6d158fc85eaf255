"""The processes a rank starts (Megatron's checkpoint writers, data loader workers) end with it.

A rank that ends in Python stops its helpers itself (fatal.py; Megatron closes its writer). A
rank killed with SIGKILL (the OOM killer, a kill -9 of one process) cannot: its helpers lived on
as orphans, each holding its memory (the manager process serving Megatron's checkpoint
writer, about 270 MB: job/checkpoint/results_queue.py) and, through its pipe, the rank's multiprocessing resource tracker. Here each helper
watches its parent from a daemon thread and exits within POLL_S seconds of losing it (the
process is re-parented). What such a helper was writing belongs to a save that never
completes: its rank is gone before marking it (checkpointing.py), and the next launch deletes
it.

Helpers are spawned (that manager, on both releases, with `--async-save`): a spawned
process runs the job's main script again as `__mp_main__`, which calls `exit_with_parent`. Or
forked (data loader workers, a background save's writer and its write workers): `watch_forked_helpers`, called by
every rank at its start (fatal.run), starts the watch in every child it forks, and each child
passes it on to its own.
"""

import multiprocessing
import os
import threading
import time

POLL_S = 1.0
_registered = False


def exit_with_parent(pid: int = None) -> None:
    """End this process (os._exit(1)) within POLL_S seconds once its parent `pid` is gone
    (default: the process that spawned it, as multiprocessing records it)."""
    if pid is None:
        parent = multiprocessing.parent_process()
        pid = parent.pid if parent is not None else os.getppid()

    def watch():
        while os.getppid() == pid:
            time.sleep(POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def watch_forked_helpers() -> None:
    """Every process this one forks from now on ends with it (once per process)."""
    global _registered
    if not _registered:
        os.register_at_fork(after_in_child=lambda: exit_with_parent(os.getppid()))
        _registered = True
