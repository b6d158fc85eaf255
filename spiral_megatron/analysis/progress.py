"""Progress of the analysis tools (issue 17): a tqdm bar on a terminal, plain lines in a log.

tqdm redraws its line with `\r`, so a log file would hold one huge line; off a terminal the
same bar is written as one line per update, at most every `log_interval_s` (and at the end).
"""

import sys
from typing import Optional


class _Lines:
    """A file for tqdm that turns each `\r` redraw into a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int, unit: str, stream=None, log_interval_s: float = 10.0, desc: Optional[str] = None):
    """A tqdm progress bar over `total` `unit`s on `stream` (default stderr)."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, unit=unit, desc=desc, file=stream if tty else _Lines(stream),
                mininterval=0.1 if tty else log_interval_s, dynamic_ncols=tty, ncols=None if tty else 100)
