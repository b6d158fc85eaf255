"""One job per checkpoint folder: a lock file whose holder any later job can judge alone.

Two jobs saving into one folder interleave their checkpoints and move each other's tracker.
Rank 0 holds `SAVE/.spiral_job.lock` and deletes it at exit. The file names its holder: host,
pid, the pid's start time and the machine's boot id, a random token, and its lease. It is
created atomically: written under a temporary name, then hard-linked to the lock's name, which
fails if that name exists (atomic on local and NFS file systems; O_EXCL where links are not
supported). A job that finds it judges the holder:

- the same machine (host name and boot id): alive while its pid runs, is not a zombie and
  started at the recorded time (a reused pid is another program), else gone;
- the same host name after a reboot (another boot id): gone;
- another machine: by its lease. The holder touches the lock every `heartbeat_s` from a daemon
  thread; a lock untouched for `lease_s` is gone. Its age is read on the file system's clock
  (the mtime of a file created there now), so the machines' clocks need not agree. A younger
  lock is watched until it is touched (alive: refused) or its lease runs out (gone).

A gone holder's lock is taken over safely when several jobs try at once: each renames it to a
name of its own (atomic: one wins), checks that what it moved is the lock it judged (else puts
it back), then creates its own as above. The heartbeat checks that the lock is still its own:
if another job took over (this job's lease ran out while it was stopped), `on_lost` is called
(the job ends: two jobs never write one folder); if a person deleted it, it is created again.
"""

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Tuple

from spiral_megatron.job.settings.config import ConfigError

LOCK = ".spiral_job.lock"
# [ours] Touched every 15 s; gone after 120 s untouched: a requeue onto another machine waits at
# most that long, and a holder survives several missed beats (a busy host, a slow file server).
HEARTBEAT_S, LEASE_S = 15.0, 120.0


class FolderLocked(ConfigError):
    """Another job holds the checkpoint folder."""


def boot_id() -> Optional[str]:
    """This boot of this machine (Linux), or None."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> Optional[Tuple[str, int]]:
    """(state letter, start time in clock ticks since boot) of `pid` from /proc, or None when
    no such process exists; raises OSError where /proc is not available."""
    if not Path("/proc/self/stat").exists():
        raise OSError("no /proc")
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime 22
    return fields[0], int(fields[19])


def _gone_reason(pid: int, started: Optional[int]) -> Optional[str]:
    """Why the process `pid` (started at `started` ticks) is not running any more, or None."""
    try:
        found = process_start(pid)
    except OSError:  # no /proc: only whether some process has this pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid} is not running"
        except PermissionError:
            pass
        return None
    if found is None:
        return f"pid {pid} is not running"
    state, start = found
    if state in ("Z", "X"):
        return f"pid {pid} is a zombie"
    if started is not None and start != started:
        return f"pid {pid} is now another program"
    return None


def _open_read(path: Path) -> Tuple[Optional[str], Optional[os.stat_result]]:
    """(text, stat) of `path`, opened afresh (NFS revalidates its attributes on open); (None,
    None) if it does not exist."""
    try:
        with open(path) as f:
            return f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        return None, None


def _parse(text: Optional[str]) -> dict:
    try:
        holder = json.loads(text or "")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


class FolderLock:
    """`acquire()` returns a warning line (a gone holder's lock taken over) or None, and starts
    the heartbeat; `release()` stops it and deletes the lock if it is still ours."""

    def __init__(self, folder, heartbeat_s: float = HEARTBEAT_S, lease_s: float = LEASE_S,
                 on_lost: Optional[Callable[[str], None]] = None, say: Callable[[str], None] = print):
        self.path = Path(folder) / LOCK
        self.heartbeat_s, self.lease_s, self.on_lost, self.say = heartbeat_s, lease_s, on_lost, say
        self.token = uuid.uuid4().hex
        started = process_start(os.getpid()) if Path("/proc/self/stat").exists() else None
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": started and started[1],
                   "boot_id": boot_id(), "token": self.token, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "heartbeat_s": heartbeat_s, "lease_s": lease_s}
        self.text = json.dumps(self.me)
        self.held, self.lost = False, None
        self._stop, self._beat = threading.Event(), None

    def acquire(self) -> Optional[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        warning = None
        for _ in range(8):  # each round: create, or judge the holder and move a gone one aside
            if self._create():
                self.held = True
                self._remove_leftovers()
                self._beat = threading.Thread(target=self._heartbeat, name="spiral-lock-heartbeat", daemon=True)
                self._beat.start()
                return warning
            text, stat = _open_read(self.path)
            if text is None:
                continue  # released meanwhile
            reason = self._gone(_parse(text), text, stat)
            if reason and self._move_aside(text):
                holder = _parse(text)
                warning = (f"warning: took over the lock {self.path} of a job that is gone (pid "
                           f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}: {reason})")
        raise FolderLocked(f"save {str(self.path.parent)!r}: other jobs keep taking its lock {self.path}; "
                           f"is the same job being started several times?")

    def _create(self) -> bool:
        """Create the lock with our content, atomically; False if it exists."""
        tmp = self.path.with_name(f"{LOCK}.{self.token}.tmp")
        with open(tmp, "w") as f:
            f.write(self.text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here: O_EXCL (its content appears a moment later)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(self.text)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _gone(self, holder: dict, text: str, stat: os.stat_result) -> Optional[str]:
        """Why the lock's holder is gone; raises FolderLocked while it is alive; None when an
        unreadable lock changed meanwhile (being written: judge it again)."""
        host, pid = holder.get("host"), holder.get("pid")
        if host == self.me["host"] and isinstance(pid, int):
            if holder.get("boot_id") and self.me["boot_id"] and holder["boot_id"] != self.me["boot_id"]:
                return "this machine has restarted since"
            reason = _gone_reason(pid, holder.get("started"))
            if reason:
                return reason
            raise self._locked(holder, "it is running")
        lease = holder.get("lease_s") if isinstance(holder.get("lease_s"), (int, float)) else None
        if lease is None and holder:  # an older job's lock, never renewed: nothing to judge it by
            raise self._locked(holder, f"it cannot be checked from {self.me['host']}; delete {self.path} "
                                       f"if that job is gone")
        return self._watch_lease(holder, text, stat, lease or self.lease_s)

    def _watch_lease(self, holder: dict, text: str, stat: os.stat_result, lease: float) -> Optional[str]:
        """Wait until the lock is touched (alive: FolderLocked) or `lease` s have passed since it
        last was (gone), on the file system's clock. An unreadable lock (`holder` empty) that
        changes is judged again (None)."""
        age = self._fs_now() - stat.st_mtime
        if age < lease:
            self.say(f"the lock {self.path} names pid {holder.get('pid')} on host {holder.get('host')}: "
                     f"waiting up to {lease - age:.0f} s for it to renew its {lease:.0f} s lease")
        while age < lease:
            time.sleep(min(1.0, lease - age))
            now_text, now_stat = _open_read(self.path)
            if now_text != text or now_stat is None or now_stat.st_mtime_ns != stat.st_mtime_ns:
                if not holder:
                    return None
                raise self._locked(holder, "it renews its lease")
            age = self._fs_now() - stat.st_mtime
        what = "its lease" if holder else "an unreadable lock file's age"
        return f"{what} of {lease:.0f} s ran out {age - lease:.0f} s ago"

    def _fs_now(self) -> float:
        """The file system's current time: the mtime of a file created there now."""
        probe = self.path.with_name(f"{LOCK}.{self.token}.clock")
        with open(probe, "w") as f:
            now = os.fstat(f.fileno()).st_mtime
        probe.unlink(missing_ok=True)
        return now

    def _move_aside(self, judged: str) -> bool:
        """Rename the gone holder's lock away (one of several racing jobs wins); True if what
        was moved is the lock that was judged, else it is put back."""
        aside = self.path.with_name(f"{LOCK}.{self.token}.gone")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved, _ = _open_read(aside)
        if moved != judged:  # another job's fresh lock: put it back (unless a third one exists)
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _remove_leftovers(self) -> None:
        """Temporary files of killed attempts (our lock is held: no live attempt needs them)."""
        for path in self.path.parent.glob(f"{LOCK}.*"):
            if self.token not in path.name:
                path.unlink(missing_ok=True)

    def _locked(self, holder: dict, why: str) -> FolderLocked:
        where = f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "an unreadable lock file"
        return FolderLocked(f"save {str(self.path.parent)!r} is in use by another job ({where}, since "
                            f"{holder.get('since', '?')}): {why}; wait for it, or use another --save folder")

    def _heartbeat(self) -> None:
        """Touch the lock every heartbeat_s while it is ours; create it again if deleted."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                text, _ = _open_read(self.path)
                if text is None and self._create():
                    continue
                if text is not None and text == self.text:
                    os.utime(self.path)
                    continue
            except OSError:
                continue  # a slow or flaky file server: try again at the next beat
            holder = _parse(_open_read(self.path)[0])
            self.lost = (f"lost the lock {self.path} to pid {holder.get('pid')} on host {holder.get('host')}: "
                         f"this job's lease ({self.lease_s:.0f} s) ran out (was the machine stopped?) and "
                         f"another job took the folder over; stopping, so that two jobs never write one folder")
            self.held = False
            if self.on_lost is not None:
                self.on_lost(self.lost)
            return

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=self.heartbeat_s + 5)
        if self.held and _open_read(self.path)[0] == self.text:
            self.path.unlink(missing_ok=True)
        self.held = False
