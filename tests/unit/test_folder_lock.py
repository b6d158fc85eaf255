"""The checkpoint folder's lock (issue 21, item 2): a gone holder never needs a person (a dead,
zombie or reused pid; a rebooted machine; another machine's expired lease), a live one is
refused (this machine's running pid; another machine that renews its lease), racing
takeovers leave one winner, and the heartbeat renews, recreates, notices a takeover and stops."""

import json
import multiprocessing
import os
import socket
import subprocess
import threading
import time

import pytest

from spiral_megatron.job.checkpoint.folder_lock import LOCK, FolderLock, FolderLocked, process_start


def write_lock(folder, **holder):
    (folder / LOCK).write_text(json.dumps({"since": "then", **holder}))


def here(pid, **more):
    return dict(host=socket.gethostname(), pid=pid, **more)


def taken_over(folder, reason: str) -> None:
    lock = FolderLock(folder)
    warning = lock.acquire()
    try:
        assert warning and "took over the lock" in warning and reason in warning, warning
        assert json.loads((folder / LOCK).read_text())["token"] == lock.token
    finally:
        lock.release()
    assert not (folder / LOCK).exists() and sorted(p.name for p in folder.iterdir()) == []


def test_gone_holders_on_this_machine_are_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path, **here(dead.pid, started=1))
    taken_over(tmp_path, f"pid {dead.pid} is not running")

    zombie = subprocess.Popen(["true"])  # exited, not yet waited for
    while process_start(zombie.pid)[0] != "Z":
        time.sleep(0.01)
    write_lock(tmp_path, **here(zombie.pid, started=process_start(zombie.pid)[1]))
    taken_over(tmp_path, f"pid {zombie.pid} is a zombie")
    zombie.wait()

    # This very process, but the lock says it started at another time: a reused pid.
    write_lock(tmp_path, **here(os.getpid(), started=process_start(os.getpid())[1] - 1))
    taken_over(tmp_path, f"pid {os.getpid()} is now another program")

    write_lock(tmp_path, **here(os.getpid(), boot_id="another-boot"))
    taken_over(tmp_path, "this machine has restarted since")


def test_a_live_holder_is_refused(tmp_path):
    first = FolderLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(FolderLocked, match=rf"in use by another job \(pid {os.getpid()} on host .*it is running"):
        FolderLock(tmp_path).acquire()
    first.release()
    # An older job's lock (no lease) from another machine cannot be judged: a person decides.
    write_lock(tmp_path, host="node-17", pid=4242)
    with pytest.raises(FolderLocked, match=rf"pid 4242 on host node-17.*delete {tmp_path / LOCK} if that job is gone"):
        FolderLock(tmp_path).acquire()


def test_another_machine_is_judged_by_its_lease(tmp_path):
    write_lock(tmp_path, host="node-17", pid=4242, token="x", lease_s=3.0)
    old = time.time() - 10
    os.utime(tmp_path / LOCK, (old, old))  # untouched for 10 s: its 3 s lease ran out
    started = time.monotonic()
    taken_over(tmp_path, "its lease of 3 s ran out 7 s ago")
    assert time.monotonic() - started < 2

    # A holder that renews: watched until it touches the lock, then refused.
    write_lock(tmp_path, host="node-17", pid=4242, token="y", lease_s=3.0)
    stop = threading.Event()

    def renew():
        while not stop.wait(0.5):
            os.utime(tmp_path / LOCK)

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    said = []
    try:
        with pytest.raises(FolderLocked, match="pid 4242 on host node-17.*it renews its lease"):
            FolderLock(tmp_path, say=said.append).acquire()
    finally:
        stop.set()
        renewer.join()
    assert said and "waiting up to" in said[0]
    # Once it stops renewing, the lease runs out and the lock is taken over.
    taken_over(tmp_path, "its lease of 3 s ran out")


def race(folder, barrier, tried, results):
    barrier.wait()
    lock = FolderLock(folder)
    try:
        results.put(("won", lock.acquire()))
        tried.wait()  # alive until every racer has judged it (however slow a loaded machine is)
        lock.release()
    except FolderLocked as e:
        results.put(("refused", str(e)))
        tried.wait()


def test_racing_takeovers_leave_one_holder(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path, **here(dead.pid))
    ctx = multiprocessing.get_context("fork")
    barrier, tried, results = ctx.Barrier(4), ctx.Barrier(4), ctx.Queue()
    racers = [ctx.Process(target=race, args=(tmp_path, barrier, tried, results)) for _ in range(4)]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=60) for _ in racers]
    for racer in racers:
        racer.join(timeout=60)
    assert sorted(kind for kind, _ in outcomes) == ["refused", "refused", "refused", "won"], outcomes
    assert all("it is running" in text for kind, text in outcomes if kind == "refused"), outcomes
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def eventually(condition, timeout: float = 30) -> bool:
    """Whether `condition()` turns true within `timeout` s (a heartbeat of 0.2 s on a loaded machine)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_the_heartbeat_renews_recreates_notices_a_takeover_and_stops(tmp_path):
    lost = []
    lock = FolderLock(tmp_path, heartbeat_s=0.2, lease_s=2, on_lost=lost.append)
    lock.acquire()
    assert lock._beat.daemon and lock._beat.is_alive()
    before = os.stat(tmp_path / LOCK).st_mtime_ns
    assert eventually(lambda: os.stat(tmp_path / LOCK).st_mtime_ns > before)  # renewed
    (tmp_path / LOCK).unlink()  # deleted by a person: created again
    assert eventually(lambda: (tmp_path / LOCK).exists())
    assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.token
    write_lock(tmp_path, host="node-17", pid=4242, token="theirs", lease_s=2)  # taken over meanwhile
    assert eventually(lambda: lost)
    assert len(lost) == 1 and "lost the lock" in lost[0] and "pid 4242 on host node-17" in lost[0]
    assert not lock._beat.is_alive()
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "theirs"  # not ours to delete

    lock = FolderLock(tmp_path / "b", heartbeat_s=30)
    lock.acquire()
    started = time.monotonic()
    lock.release()  # stops the heartbeat at once, not after its 30 s wait
    assert not lock._beat.is_alive() and time.monotonic() - started < 5
    assert not (tmp_path / "b" / LOCK).exists()
