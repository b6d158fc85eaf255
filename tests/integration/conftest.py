"""Launch pretrain_spiral.py as users do (plain python for 1 rank, torch.distributed.run for 2).

Every launch shares one cache folder (the embedded corpus is built once per test session)
and uses tiny step counts: the point is behaviour, not convergence.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import PYTHONPATH  # the repository, then the user's PYTHONPATH
from tests.jobs import Job

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "pretrain_spiral.py"

# A few-step job: 4 micro-batches of 2 per step, short eval, no warmup surprises.
TINY = ("--micro-batch-size", 2, "--global-batch-size", 4, "--train-iters", 4, "--lr-warmup-iters", 1,
        "--log-interval", 1, "--eval-interval", 2, "--eval-iters", 1, "--save-interval", 2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("spiral_cache")


@pytest.fixture(scope="session")
def reference(cache_dir, tmp_path_factory):
    """4 steps in one single-process run (saves at 2 and 4): the losses everything is compared to.

    Returns (folder, {iteration: logged record}, stdout); the checkpoints are in folder/ckpt.
    """
    out = tmp_path_factory.mktemp("reference")
    proc = launch(cache_dir, *TINY, "--save", out / "ckpt", "--log-json", out / "log.jsonl", "--log-params-norm",
                  "--log-num-zeros-in-grad")
    return out, logged(out / "log.jsonl"), proc.stdout


def command(nproc: int, args, python: str = sys.executable) -> list:
    launch = [python]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launch + [str(SCRIPT), *map(str, args)]


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def environment(cache_dir) -> dict:
    """This environment minus any torch.distributed rendezvous of the test process itself."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=PYTHONPATH, SPIRAL_CACHE=str(cache_dir),
                PYTHONWARNINGS="ignore")


def launch(cache_dir, *args, nproc: int = 1, expect_rc: int = 0, timeout: int = 300, python: str = sys.executable):
    """Run the job (with `python`: another environment's); fail with its output when the exit
    code is not `expect_rc`, or when it runs past `timeout` s (every process of it killed)."""
    with tempfile.TemporaryDirectory() as folder, Job(command(nproc, args, python), environment(cache_dir), folder) as job:
        code = job.wait(timeout)
        proc = subprocess.CompletedProcess(job.cmd, code, job.stdout(), job.stderr())
    if proc.returncode != expect_rc:
        pytest.fail(f"exit {proc.returncode} (expected {expect_rc}) for {args}\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def checkpoint_at(root, iteration: int, dest):
    """A checkpoint folder `dest` whose latest (only) checkpoint is `root`'s `iteration`."""
    import shutil

    from spiral_megatron.job.checkpoint.checkpointing import TRACKER, iteration_dir

    shutil.copytree(iteration_dir(root, iteration), iteration_dir(dest, iteration))
    (Path(dest) / TRACKER).write_text(str(iteration))
    return dest


def logged(path) -> dict:
    """iteration -> the JSON record of that training step (evaluation-only lines skipped)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {r["iteration"]: r for r in records if "loss" in r}
