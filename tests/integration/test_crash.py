"""Any crash, then the same command again, continues (issue 21, item 2): the whole job killed
(SIGKILL to every process, as a scheduler does) at start-up, in a save, in a background save,
at teardown, and at random moments (tools/crash_test.py); each relaunch of `--load X --save X`
starts on its own and every step it logs equals the uninterrupted run's, bitwise. A rank killed
alone (the OOM killer) leaves no helper process behind."""

import sys
import time
from pathlib import Path

import psutil
import pytest

from spiral_megatron.job.checkpoint.checkpointing import TRACKER
from spiral_megatron.job.checkpoint.folder_lock import LOCK
from tests.integration.conftest import ROOT, TINY, environment, launch
from tests.jobs import Job, crash_test

pytestmark = [pytest.mark.checkpoint, pytest.mark.both_releases]  # CI runs it on megatron-core 0.16.1 too


def killed(cache_dir, args, fault: str, timeout: float = 300, stopped=None) -> str:
    """Run the job with `fault` (a pause point of tests/integration/faulty_job.py), wait until
    it stops there, call `stopped(process)` (the job's process) if given, kill every process of
    it; returns what it printed."""
    env = dict(environment(cache_dir), SPIRAL_TEST_FAULT=fault)
    folder = Path(args[args.index("--save") + 1]).parent
    with Job([sys.executable, ROOT / "tests" / "integration" / "faulty_job.py", *args], env, folder,
             fault.replace(":", "-")) as job:
        deadline = time.monotonic() + timeout
        while psutil.Process(job.pid).status() != psutil.STATUS_STOPPED:
            assert job.proc.poll() is None, f"exited {job.proc.returncode} before {fault}:\n{job.stdout()[-3000:]}"
            assert time.monotonic() < deadline, f"never reached {fault}:\n{job.stdout()[-3000:]}"
            time.sleep(0.05)
        if stopped:
            stopped(psutil.Process(job.pid))
    return job.stdout() + job.stderr()


def names(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir())


def finished(folder) -> bool:
    """The folder of a finished job: its two checkpoints, tracker and config.yaml, nothing else
    (besides warnings.log, written when the job held harmless warnings: megatron-core 0.19.2's
    start-up has some, 0.16.1's none)."""
    return [n for n in names(folder) if n != "warnings.log"] == sorted([TRACKER, "config.yaml", "iter_0000002",
                                                                       "iter_0000004"])


def assert_same_steps(reference, log) -> None:
    """Every step logged by every launch equals the uninterrupted run's (loss, lr: bitwise)."""
    records = crash_test.logged(log)
    assert {r["iteration"] for r in records} == set(reference), records
    for r in records:
        assert (r["loss"], r["lr"]) == (reference[r["iteration"]]["loss"], reference[r["iteration"]]["lr"]), r


def test_killed_at_startup_in_a_save_and_at_teardown(reference, cache_dir, tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    args = [*TINY, "--load", save, "--save", save, "--log-json", log]
    # Start-up: the folder holds only what the job writes before its first checkpoint.
    killed(cache_dir, args, "pause:startup")
    assert names(save) == [LOCK, "config.yaml"]
    # In the second save (iteration 4): its shards are in the staging folder, unpublished.
    out = killed(cache_dir, args, "pause:save:2")
    assert "starting from scratch" in out and (save / TRACKER).read_text() == "2"
    assert ".iter_0000004.saving" in names(save)
    # Teardown: everything saved, the lock not yet released.
    out = killed(cache_dir, args, "pause:teardown")
    assert "took over the lock" in out and "resumed from" in out and "at iteration 2" in out
    assert (save / TRACKER).read_text() == "4" and LOCK in names(save)
    proc = launch(cache_dir, *args)
    assert "took over the lock" in proc.stdout and "pretrain_spiral: finished iteration 4" in proc.stdout
    assert finished(save)
    assert_same_steps(reference[1], log)


def rank_killed_alone(rank) -> None:
    """SIGKILL to the rank only, as the OOM killer sends it: its helpers (the forked background
    writer and its workers, the spawned manager of the writer's results) end with it (job/run/parent_watch.py), and the
    resource tracker once they are gone."""
    helpers = rank.children(recursive=True)
    assert helpers, "no background writer to orphan"
    rank.kill()
    _, alive = psutil.wait_procs(helpers, timeout=15)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]


def test_killed_in_a_background_save(reference, cache_dir, tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    args = [*TINY, "--async-save", "--load", save, "--save", save, "--log-json", log]
    killed(cache_dir, args, "pause:background-save", stopped=rank_killed_alone)  # its writer was left to run on
    assert not (save / TRACKER).exists()
    proc = launch(cache_dir, *args)
    assert "pretrain_spiral: finished iteration 4" in proc.stdout
    assert finished(save)
    assert_same_steps(reference[1], log)


def test_random_kills(cache_dir, tmp_path, monkeypatch, capsys):
    """tools/crash_test.py in short: 2 kills at random moments of a 4-step job, one process
    (the long run, 40 kills of the whole torchrun job, is the tool's command in docs/CHECKPOINTS.md)."""
    monkeypatch.setenv("SPIRAL_CACHE", str(cache_dir))
    code = crash_test.main(["--kills", "2", "--seed", "1", "--nproc", "1", "--out", str(tmp_path),
                            "--launch-timeout", "240", "--job", *map(str, TINY)])
    out = capsys.readouterr().out
    assert code == 0 and "PASS: survived 2 of 2 kills" in out, out
