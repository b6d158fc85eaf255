"""Shared fixtures: one single-process Megatron (gloo, CPU path) per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def megatron():
    """Megatron's parallel_state at TP=PP=1 in this process (world size 1, gloo)."""
    from spiral_megatron import parallel

    parallel.initialize(tensor_parallel=1, pipeline_parallel=1, seed=1234, backend="gloo")
    yield
    parallel.destroy()


def torchrun(script, nproc: int, *args, timeout: int = 600) -> str:
    """Run `script` under `python -m torch.distributed.run --standalone`; return its stdout.

    Fails the test with the ranks' output when the launch exits non-zero.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout
