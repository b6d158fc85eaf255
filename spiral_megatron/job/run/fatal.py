"""One rank's error ends the whole job within seconds, printed once (issue 21, item 9).

Python's own exit after an uncaught exception can hang a failed rank forever: its
`multiprocessing` exit handler sends SIGTERM to the DataLoader workers, which ignore it (they
leave SIGTERM to the trainer: data.py), then joins them without a timeout. Measured on the
debug flavor at PP2 x DP2 with the distributed optimizer: two ranks raised in the first save,
printed their traceback and never exited; the other two waited in the save's collective; the
job hung until torchrun was killed. So a failed worker never exits through Python's shutdown:

    run(main, argv): 0 -> a normal exit; anything else (a code, an exception, an exception in
    any thread) -> report it, flush, SIGKILL this process's helper processes (loader workers,
    Megatron's save helper and forked writers, and their children), os._exit.

The ranks still running then fail in their next collective (gloo: "Connection closed by peer")
and take the same way out, and torchrun (polling every 0.1 s, its default) signals the rest.
An error caused by a peer that died is not the root cause: it is one line without a traceback
and no torchrun error file, and that rank exits PEER_EXIT_DELAY_S later, so torchrun names the
rank that failed first (errors.py).
"""

import faulthandler
import os
import sys
import threading
import time
import traceback
from typing import Callable, NoReturn

from spiral_megatron.job.run import parent_watch
from spiral_megatron.job.run.errors import report

# A rank stopped by another's failure exits this much later than it finds out: torchrun
# (polling every 0.1 s) then sees the failing rank exit alone and names it the root cause. Had
# both exited before its poll, it would pick by the error file's timestamp, in whole seconds,
# where a rank without a file counts as failing at the poll: in the same second it names rank 0.
PEER_EXIT_DELAY_S = 1.5
# multiprocessing's resource tracker, in a process's command line: it is left to exit on its own,
# cleaning up the semaphores of the helpers killed around it
RESOURCE_TRACKER = "multiprocessing.resource_tracker"
# What gloo and the sockets under torch.distributed say when the other end of a collective died.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "remote worker crashing", "Socket Timeout")


def peer_failure(error: BaseException) -> bool:
    """Whether `error` (or what it was raised from) says another rank went away."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionError) or any(text in str(error) for text in PEER_GONE):
            return True
        error = error.__cause__ or error.__context__
    return False


def describe(error: BaseException, where: str = "") -> int:
    """Print `error` once and record it for torchrun; returns the exit code for it."""
    rank = os.environ.get("RANK", "0")
    if isinstance(error, KeyboardInterrupt):
        print(f"pretrain_spiral: rank {rank}: interrupted", file=sys.stderr, flush=True)
        return 130
    if peer_failure(error):  # a consequence: the rank that failed first reports the cause
        last = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        print(f"pretrain_spiral: rank {rank} stopped: another rank of the job failed ({last})",
              file=sys.stderr, flush=True)
        return 1
    line = f"pretrain_spiral: rank {rank}{where}: {type(error).__name__}: {error}"
    report(line, "".join(traceback.format_exception(error)) + line)
    return 1


def helpers() -> list:
    """Every process below this one (loader workers, Megatron's save helper and background
    writer, and the writer's own forked workers), except multiprocessing's resource tracker,
    which cleans up their semaphores once they are gone."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if RESOURCE_TRACKER not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def exit_now(code: int) -> NoReturn:
    """Flush, kill every helper process of this one, and exit with `code` at once. The whole
    tree, not only the direct children: a background writer's forked workers left behind wait
    forever on a lock their dead parent held (seen with megatron-core 0.16.1's async save),
    holding the job's stdout and the machine's memory."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        children = helpers()  # a snapshot before any dies: the tree is still whole
    except Exception:  # noqa: BLE001 - nothing may stop the exit
        children = []
    for child in children:
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass
    os._exit(code)


def let_the_reporter_exit_first() -> None:
    """For a rank ending on an error another rank found (and prints): wait PEER_EXIT_DELAY_S, so
    that torchrun sees that rank exit first, after its line is out, and names it."""
    time.sleep(PEER_EXIT_DELAY_S)


def fail(error: BaseException, where: str = "") -> NoReturn:
    """Report `error` (`describe`) and end this process; a consequence of a peer's failure
    leaves after that peer (`let_the_reporter_exit_first`)."""
    code = describe(error, where)
    if peer_failure(error):
        let_the_reporter_exit_first()
    exit_now(code)


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: an exception in any thread of a job ends the job."""
    if args.exc_type is SystemExit:
        return
    fail(args.exc_value, where=f" (thread {args.thread.name if args.thread else '?'})")


def stop(line: str, code: int = 1) -> NoReturn:
    """Report `line` (the root cause) and end this process at once, from any thread."""
    report(line)
    exit_now(code)


def run(main: Callable[[list], int], argv: list) -> NoReturn:
    """The process's whole life: `main(argv)`, then exit (quickly unless it returned 0)."""
    faulthandler.enable(all_threads=True)  # a native crash still prints every thread's stack
    threading.excepthook = _thread_failed
    parent_watch.watch_forked_helpers()  # a helper forked from here ends with this process, even one killed -9
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: B036 - every error ends the job, KeyboardInterrupt included
        fail(e)
    if code == 0:
        sys.exit(0)
    exit_now(code)
