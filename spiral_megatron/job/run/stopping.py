"""When a run stops before its steps are done (Megatron-LM's rules): SIGTERM/SIGINT, a time
limit (--exit-duration-in-mins), and the next multiple of --exit-interval. Every rank learns
of a signal or the time limit at the same step (the step's all-reduced flags, step.StepFlags)."""

import signal
import time
from typing import Optional


class ExitSignal:
    """Records SIGTERM/SIGINT, and a time limit passed (Megatron-LM's --exit-duration-in-mins,
    minutes since `started`, a time.monotonic()); every rank learns of either at the same step
    (in the step's all-reduce, step.StepFlags), so all stop together."""

    def __init__(self, limit_minutes: Optional[float], started: float):
        self.signaled, self.limit_minutes, self.started = False, limit_minutes, started
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signaled = True

    def minutes(self) -> float:
        return (time.monotonic() - self.started) / 60

    @property
    def time_up(self) -> bool:
        return self.limit_minutes is not None and self.minutes() > self.limit_minutes

    @property
    def received(self) -> bool:
        return self.signaled or self.time_up

    def reason(self) -> str:
        """Why the run stops (on this rank: another may have seen it first)."""
        if self.time_up and not self.signaled:
            return f"exit duration {self.limit_minutes:g} min reached ({self.minutes():.1f} min since the job started)"
        return "exit signal received"


def end_iteration(start: int, train_iters: int, exit_interval: Optional[int]) -> int:
    """The iteration a run that starts at `start` stops after: train_iters, or before it the first
    multiple of exit_interval after `start` (Megatron-LM's --exit-interval: a job requeued with the
    same command trains exit_interval more steps each time)."""
    if not exit_interval:
        return train_iters
    return min(train_iters, (start // exit_interval + 1) * exit_interval)


def resume_hint(save: Optional[str], resumes_save: bool) -> str:
    """How a run stopped early goes on: the same command where it resumes its --save folder
    (startup.resumes_save), else naming the --load it needs (startup refuses to write over a
    checkpoint it does not resume)."""
    if not save:
        return "no --save folder: nothing was saved"
    if resumes_save:
        return "the same command resumes"
    return f"add --load {save} to resume"
