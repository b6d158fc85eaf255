"""A test's job in a subprocess that can never hang the test: output in files, every process of
it killed at the end (tools/crash_test.kill_job finds them by a tag in their environment)."""

import contextlib
import importlib.util
import subprocess
import time
from pathlib import Path
from typing import Optional

import psutil
import pytest

from spiral_megatron.job.run import fatal

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("crash_test", ROOT / "tools" / "crash_test.py")
crash_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crash_test)


class Job:
    """A job started in a session of its own, its output in files (reading them never waits on
    a process, as a pipe held by a leftover child would). Leaving the `with` kills every process
    it started (tools/crash_test.kill_job, by a tag in their environment: also a child whose
    parent is gone). `follow` records when each line arrived."""

    def __init__(self, cmd, env: dict, folder, name: str = "job", merge: bool = False):
        """merge: stderr into stdout (one file, one order)."""
        self.cmd, self.env = list(map(str, cmd)), env
        self.out = Path(folder) / f"{name}.out"
        self.err = self.out if merge else Path(folder) / f"{name}.err"
        self.lines = []  # (arrival time, line) of stdout, filled by `follow`/`wait_for`

    def __enter__(self):
        env, self.tag = crash_test.tagged(self.env)
        with open(self.out, "w") as out, (contextlib.nullcontext(subprocess.STDOUT) if self.err == self.out
                                          else open(self.err, "w")) as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        self.pid, self._read = self.proc.pid, 0
        return self

    def __exit__(self, *exc):
        self.kill()

    def kill(self) -> None:
        crash_test.kill_job(self.pid, self.tag)
        self.proc.wait()

    def leftovers(self, grace: float = 10) -> list:
        """What of the job still runs `grace` s after it ended (command lines), besides
        multiprocessing's resource tracker, which exits once its clients are gone."""
        deadline = time.monotonic() + grace
        while True:
            left = []
            for p in crash_test.tagged_processes(self.tag):
                try:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        left.append(" ".join(p.cmdline())[:200])
                except psutil.Error:
                    pass
            left = [c for c in left if fatal.RESOURCE_TRACKER not in c]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return "" if self.err == self.out else self.err.read_text()

    def _poll_lines(self) -> None:
        with open(self.out, "rb") as f:
            f.seek(self._read)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._read += len(complete)
        now = time.monotonic()
        self.lines += [(now, line) for line in complete.decode(errors="replace").splitlines(keepends=True)]

    def wait_for(self, predicate, timeout: float = 300) -> str:
        """Poll stdout until a line satisfies `predicate`; returns it. Fails with the output if
        the job exits first or `timeout` s pass."""
        deadline, seen = time.monotonic() + timeout, 0
        while True:
            self._poll_lines()
            for _, line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.lines)
            code = self.proc.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"exited {code}" if code is not None else f"still running after {timeout} s"
                pytest.fail(f"{' '.join(self.cmd)}: {why} before the line awaited\n{self.stdout()[-3000:]}\n"
                            f"{self.stderr()[-3000:]}")
            time.sleep(0.05)

    def follow(self, timeout: float = 300) -> Optional[int]:
        """Record stdout's lines as they arrive until the job exits (its code) or `timeout` s
        pass (None)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._poll_lines()
            time.sleep(0.05)
        self._poll_lines()
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(self.cmd)} still running after {timeout} s\n{self.stdout()[-3000:]}\n"
                        f"{self.stderr()[-3000:]}")
