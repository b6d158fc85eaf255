"""One job per checkpoint folder: a lock file naming its holder's host and pid.

Two jobs saving into one folder interleave their checkpoints and move each other's marker.
Rank 0 creates `SAVE/.spiral_job.lock` exclusively (O_EXCL: atomic on local and NFS file
systems, unlike flock) and deletes it at exit. A second job is refused, naming the holder. A
lock left by a killed job is taken over when its pid is dead on this same host (a warning
line says so); a lock from another host cannot be checked from here: the message says to
delete it if that job is gone.
"""

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from spiral_megatron.job.settings.config import ConfigError

LOCK = ".spiral_job.lock"


class FolderLocked(ConfigError):
    """Another job holds the checkpoint folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class FolderLock:
    """`acquire()` returns a warning line (a stale lock taken over) or None; `release()` deletes
    the lock if it is still ours."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def acquire(self) -> Optional[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over_stale()
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        self.held = True
        return None

    def _take_over_stale(self) -> str:
        holder = _read(self.path)
        host, pid = holder.get("host"), holder.get("pid")
        if host == self.me["host"] and isinstance(pid, int) and not _pid_alive(pid):
            tmp = self.path.with_name(f"{LOCK}.{os.getpid()}")
            tmp.write_text(json.dumps(self.me))
            os.replace(tmp, self.path)
            self.held = True
            return (f"warning: took over the lock {self.path} of a job that is gone "
                    f"(pid {pid} on {host}, since {holder.get('since')})")
        where = f"pid {pid} on host {host}" if host else "an unreadable lock file"
        raise FolderLocked(
            f"save {str(self.path.parent)!r} is in use by another job ({where}, since "
            f"{holder.get('since', '?')}); wait for it, use another --save folder, or delete "
            f"{self.path} if that job is gone")

    def release(self) -> None:
        if self.held and _read(self.path).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False
