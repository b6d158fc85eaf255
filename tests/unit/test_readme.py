"""The README's Python snippet of the model runs as shown, in a fresh process."""

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_model_snippet_runs_as_shown():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The model in Python", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    check = "\nassert logits.shape == (2, 128, 512) and loss.shape == (2, 128)\nprint('ok')\n"
    env = {k: v for k, v in os.environ.items()  # a fresh process: not this one's process group, if any
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", snippet + check], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
