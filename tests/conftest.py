"""Shared fixtures: one single-process Megatron (gloo, CPU path) per test session.

The suite outside tests/gpu is pinned to the CPU on every host: CUDA devices are hidden from
this process and every process it launches (`CUDA_VISIBLE_DEVICES=""`, set before torch
initialises CUDA), so on a GPU machine it runs the same gloo + CPU path as in CI instead of
building models on the CPU while Megatron allocates on the current GPU. tests/gpu launches
its jobs with the devices the user had (`GPU_ENV`).
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.jobs import Job  # imports no torch: the device pin below still comes first

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
_USER_DEVICES = os.environ.get("SPIRAL_USER_CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
os.environ["SPIRAL_USER_CUDA_VISIBLE_DEVICES"] = "" if _USER_DEVICES is None else _USER_DEVICES
# The environment tests/gpu launches GPU jobs with: the user's devices, not the CPU pin below.
# the repository first, then what the user's PYTHONPATH holds (a megatron-core installed with --target)
PYTHONPATH = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
GPU_ENV = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
if _USER_DEVICES:
    GPU_ENV["CUDA_VISIBLE_DEVICES"] = _USER_DEVICES
os.environ["CUDA_VISIBLE_DEVICES"] = ""


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
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=PYTHONPATH, PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as folder, Job(cmd, env, folder) as job:
        code = job.wait(timeout)  # past it: fails, every process of the job killed
        out, err = job.stdout(), job.stderr()
    if code != 0:
        pytest.fail(f"{' '.join(cmd)} exited {code}\n{out[-4000:]}\n{err[-8000:]}")
    return out
