"""What a job launched by torchrun on 2 ranks shows when it stops (issue 17): an error one rank
finds is reported once, not followed by the other rank's broken-connection traceback; SIGTERM to
the whole process group (SLURM preemption, scancel) saves and stops every worker cleanly, and
torchrun's own exit code is the one docs/CHECKPOINTS.md tells a requeue script to expect."""

import os
import re
import signal
import time

import pytest

from spiral_megatron.job.checkpoint.checkpointing import TRACKER
from tests.integration.conftest import ROOT, TINY, command, environment, launch
from tests.jobs import Job

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint


def test_an_error_found_by_one_rank_is_reported_once(cache_dir, tmp_path):
    proc = launch(cache_dir, *TINY, "--save", tmp_path / "ckpt", "--data-path", "/nonexistent/corpus",
                  nproc=2, expect_rc=1)
    line = "pretrain_spiral: error: data_path: '/nonexistent/corpus.bin' does not exist"
    printed = [text for text in proc.stderr.splitlines() if text.startswith(line)]
    assert len(printed) == 1, proc.stderr[-3000:]
    for noise in ("Connection closed", "[rank1]", "[rank0]"):
        assert noise not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.both_releases
def test_sigterm_to_the_process_group_under_torchrun(cache_dir, tmp_path):
    """Every worker saves and exits 0; torchrun itself, signalled too, exits 1 (its
    SignalException) once its workers are done: the checkpoint, not the code, says it is safe."""
    save = tmp_path / "ckpt"
    args = [*TINY, "--train-iters", 100000, "--eval-interval", "null", "--save-interval", "null",
            "--log-interval", 1, "--save", save]
    with Job(command(2, args), environment(cache_dir), tmp_path) as job:
        job.wait_for(lambda line: line.lstrip().startswith("iteration"))  # training runs
        os.killpg(job.pid, signal.SIGTERM)
        code = job.wait(timeout=180)
    rest, stderr = job.stdout(), job.stderr()
    if code != 1 or "SignalException" not in stderr:
        print(stderr)  # whole, under "Captured stdout call": a one-line repr of it is cut short
    assert code == 1 and "SignalException" in stderr, f"torchrun exited {code}; its stderr is printed above"
    stopped = int(re.search(r"pretrain_spiral: exit signal received: stopped after iteration (\d+)", rest).group(1))
    assert (save / TRACKER).read_text() == str(stopped)
    assert "exitcode" not in stderr  # no worker failed: torchrun reports none


@pytest.mark.parametrize("fault", ["raise:step:1:3", *(pytest.param(f, marks=pytest.mark.both_releases)  # a save's failure paths
                                   for f in ("raise:save:1", "raise:writer:1", "raise:writer:1 sync"))])
def test_a_rank_that_raises_ends_the_job_within_seconds(cache_dir, tmp_path, fault):
    """Issue 21, item 9: rank 1 raises in its third step, or as the first save starts writing
    (rank 0 then waits in the save's collectives), or in its checkpoint writer: Megatron's forked
    background writer (`--async-save`), or the writer a synchronous save runs (as a full disk
    fails it). The job ends within 30 s of the error, which is printed once and is
    torchrun's root cause; rank 0 says in one line that another rank failed. Before, a failed
    rank's exit hung on its loader workers and the job never ended; a failed background writer
    ended the job at its next finalize with `CheckpointException ranks:dict_keys([])` as the
    root cause (rank 1's: only Megatron's coordinator, rank 0, holds the failures), and a failed
    synchronous writer with rank 0's `CheckpointException ranks:dict_keys([1])` and a traceback."""
    fault, sync = fault.split(" ")[0], fault.endswith(" sync")
    async_save = "writer" in fault and not sync
    args = [*TINY, "--train-iters", 6, "--save", tmp_path / "ckpt"] + (["--async-save"] if async_save else [])
    env = dict(environment(cache_dir), SPIRAL_TEST_FAULT=fault)
    cmd = command(2, args)
    cmd[cmd.index(str(ROOT / "examples" / "pretrain_spiral.py"))] = str(ROOT / "tests" / "integration" / "faulty_job.py")
    with Job(cmd, env, tmp_path, merge=True) as job:
        code = job.follow(timeout=300)  # None: still running
        left = job.leftovers(grace=10) if code is not None else []
    lines = job.lines  # (arrival time, line)
    # nothing of the job outlives it: before, a background writer's forked worker, orphaned when
    # its rank exited, waited forever on a lock its dead parent held (megatron-core 0.16.1)
    assert not left, left
    ended = time.monotonic() if code is None else lines[-1][0]
    out = "".join(line for _, line in lines)
    failed_at = next((t for t, line in lines if "injected fault" in line), None)  # the writer: Megatron's log line
    assert failed_at is not None, out[-4000:]
    ended_after = ended - failed_at
    print(f"{fault}: the job ended {ended_after:.1f} s after the error")
    assert code == 1 and ended_after < 30, (code, ended_after, out[-4000:])
    root_cause = out[out.index("Root Cause"):]
    if "writer" in fault:  # every rank raised it; rank 0 printed it, with what Megatron's coordinator knows
        what = (f"the background save of {tmp_path / 'ckpt' / 'iter_0000002'}" if async_save
                else f"saving iteration 2 to {tmp_path / 'ckpt'}")
        error = f"pretrain_spiral: error: {what} failed (rank 1: RuntimeError: Worker failure"
        printed = [line for _, line in lines if line.startswith(error)]  # not torchrun's summary of it
        assert len(printed) == 1 and error in root_cause, out[-4000:]
        assert "the latest: none in" in root_cause and not (tmp_path / "ckpt" / TRACKER).exists(), root_cause
        assert re.search(r"MiB free on its file system\)", printed[0]), printed[0]  # a full disk's hint
        assert "Traceback" not in root_cause, root_cause
        return
    assert "rank      : 1" in root_cause, root_cause
    error = f"pretrain_spiral: rank 1: RuntimeError: injected fault: rank 1, {fault.split(':')[1]}"
    assert out.count(error) == 2, out[-4000:]  # rank 1's own line, and torchrun's root cause
    assert out.count("Traceback (most recent call last)") == 2 + (out.count("ChildFailedError") > 0), out[-4000:]
    assert out.count("pretrain_spiral: rank 0 stopped: another rank of the job failed") <= 1, out[-4000:]

