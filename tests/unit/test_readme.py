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
    proc = subprocess.run([sys.executable, "-c", snippet + check], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
