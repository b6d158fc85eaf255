"""One line per failure, also where torchrun looks for the root cause.

torchrun gives each worker an error file (TORCHELASTIC_ERROR_FILE) and shows its content as the
"Root Cause" of its failure summary; a worker that exits with a code but no file shows only
"exitcode: 2". `report` prints the line to stderr and writes it there as the traceback.
"""

import json
import os
import sys
import time
from typing import Optional


def report(line: str, traceback: Optional[str] = None, echo: bool = True) -> None:
    """Print `line` (or the `traceback` that ends in it) to stderr (unless not `echo`: another
    rank prints the same) and record it as this worker's torchrun root cause."""
    if echo:
        print(traceback or line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": traceback or line,
                                                       "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the line is on stderr already
