"""What a job launched by torchrun on 2 ranks shows when it stops (issue 17): an error one rank
finds is reported once, not followed by the other rank's broken-connection traceback; SIGTERM to
the whole process group (SLURM preemption, scancel) saves and stops every worker cleanly, and
torchrun's own exit code is the one docs/CHECKPOINTS.md tells a requeue script to expect."""

import os
import re
import signal
import subprocess

import pytest

from spiral_megatron.job.checkpoint.checkpointing import TRACKER
from tests.integration.conftest import ROOT, TINY, command, environment, launch

pytestmark = pytest.mark.checkpoint  # CI runs it on both megatron-core releases


def test_an_error_found_by_one_rank_is_reported_once(cache_dir, tmp_path):
    proc = launch(cache_dir, *TINY, "--save", tmp_path / "ckpt", "--data-path", "/nonexistent/corpus",
                  nproc=2, expect_rc=1)
    line = "pretrain_spiral: error: data_path: '/nonexistent/corpus.bin' does not exist"
    printed = [text for text in proc.stderr.splitlines() if text.startswith(line)]
    assert len(printed) == 1, proc.stderr[-3000:]
    for noise in ("Connection closed", "[rank1]", "[rank0]"):
        assert noise not in proc.stderr, proc.stderr[-3000:]


def test_sigterm_to_the_process_group_under_torchrun(cache_dir, tmp_path):
    """Every worker saves and exits 0; torchrun itself, signalled too, exits 1 (its
    SignalException) once its workers are done: the checkpoint, not the code, says it is safe."""
    save = tmp_path / "ckpt"
    args = [*TINY, "--train-iters", 100000, "--eval-interval", "null", "--save-interval", "null",
            "--log-interval", 1, "--save", save]
    with open(tmp_path / "stderr", "w") as err:
        job = subprocess.Popen(command(2, args), stdout=subprocess.PIPE, stderr=err, text=True,
                               env=environment(cache_dir), cwd=ROOT, start_new_session=True)
        try:
            for line in job.stdout:  # wait until training runs
                if line.lstrip().startswith("iteration"):
                    break
            os.killpg(job.pid, signal.SIGTERM)
            rest = job.stdout.read()
            code = job.wait(timeout=180)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert code == 1 and "SignalException" in stderr, (code, stderr[-3000:])
    stopped = int(re.search(r"pretrain_spiral: exit signal received: stopped after iteration (\d+)", rest).group(1))
    assert (save / TRACKER).read_text() == str(stopped)
    assert "exitcode" not in stderr  # no worker failed: torchrun reports none
