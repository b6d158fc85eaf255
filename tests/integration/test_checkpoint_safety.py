"""Nothing is lost (issue 11): SIGTERM to the whole process group after a periodic save, a
second job on the same folder, the first launch of `--load X --save X`, a finished job re-run,
a kill between the renames that publish a checkpoint or a converted folder, damaged markers."""

import os
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest

from spiral_megatron.job.checkpoint import checkpointing
from spiral_megatron.job.checkpoint.checkpointing import TRACKER
from spiral_megatron.job.checkpoint.folder_lock import LOCK
from spiral_megatron.job.run import fatal
from tests.integration.conftest import TINY, command, environment, launch
from tests.jobs import Job, crash_test

pytestmark = [pytest.mark.checkpoint, pytest.mark.both_releases]  # CI runs it on megatron-core 0.16.1 too

LONG = (*TINY, "--train-iters", 100000, "--eval-interval", "null", "--log-interval", 50)


def hidden(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def killed_at_second_rename(monkeypatch):
    """os.replace that raises, as a kill would stop the process, at its second call."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return lambda: monkeypatch.setattr(os, "replace", real)


# Items 1, 3, 9: the requeue command on an empty folder, a second job refused, SIGTERM to the group.
@pytest.mark.parametrize("saves", ["synchronous", "--async-save"])
def test_sigterm_to_the_process_group_after_a_periodic_save(cache_dir, tmp_path, saves):
    """SLURM preemption and scancel signal every process of the job: Megatron's checkpoint
    helper process (the manager serving its writer's results queue) used to die with it, and
    the exit save failed with BrokenPipeError. A synchronous job starts no such helper: its
    writer reports to a queue of the rank itself (job/checkpoint/results_queue.py)."""
    save = tmp_path / "ckpt"
    flags = [saves] if saves.startswith("--") else []
    with Job(command(1, [*LONG, *flags, "--save-interval", 2, "--load", save, "--save", save]),
             environment(cache_dir), tmp_path) as job:
        job.wait_for(lambda line: line.startswith("saved checkpoint"))
        spawned = [" ".join(p.cmdline()) for p in crash_test.tagged_processes(job.tag)]
        helpers = [c for c in spawned if "spawn_main" in c and fatal.RESOURCE_TRACKER not in c]
        assert (helpers == []) == (saves == "synchronous"), helpers
        warnings = [line for _, line in job.lines if "holds no checkpoint yet" in line]
        assert len(warnings) == 1 and "starting from scratch" in warnings[0], job.stdout()[-3000:]
        # A second job on the same folder is refused, naming the holder.
        second = launch(cache_dir, *TINY, "--save", save, expect_rc=2)
        assert f"in use by another job (pid {job.pid} on host {socket.gethostname()}" in second.stderr
        os.killpg(job.pid, signal.SIGTERM)
        assert job.wait(timeout=120) == 0, job.stderr()[-3000:]
    rest = job.stdout()
    stopped = int(re.search(r"stopped after iteration (\d+)", rest).group(1))
    assert stopped > 2 and (save / TRACKER).read_text() == str(stopped)
    assert (save / f"iter_{stopped:07d}" / "model_args.json").is_file()
    assert "BrokenPipeError" not in job.stderr()
    assert not (save / LOCK).exists() and hidden(save) == []


# Item 2: a finished job re-run, after a kill in the middle of publishing its last save.
def test_rerun_of_a_finished_job_keeps_its_checkpoint(reference, cache_dir, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(reference[0] / "ckpt", save)
    last = save / "iter_0000004"
    before = (last / "metadata.json").stat()
    # As a kill between the two renames of a save leaves it: the marker's folder renamed aside.
    os.replace(last, save / ".iter_0000004.replaced")
    (save / ".iter_0000006.saving").mkdir()  # and a save that never completed
    proc = launch(cache_dir, *TINY, "--load", save, "--save", save)
    assert "recovered" in proc.stdout and "pretrain_spiral: finished iteration 4" in proc.stdout
    assert "saved checkpoint" not in proc.stdout  # the same iteration is not written again
    after = (last / "metadata.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (save / TRACKER).read_text() == "4" and hidden(save) == []


def test_a_save_never_deletes_the_folder_it_replaces_first(tmp_path, monkeypatch):
    """Publishing renames the old folder aside, the new one in, then deletes the old: killed
    (here: failing) between the renames, `recover` puts the complete old folder back."""
    root = tmp_path / "ckpt"
    old, staging = checkpointing.iteration_dir(root, 2), root / ".iter_0000002.saving"
    old.mkdir(parents=True)
    (old / "weights").write_text("old")
    (root / TRACKER).write_text("2")
    staging.mkdir()
    (staging / "weights").write_text("new")
    revive = killed_at_second_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        checkpointing._publish(root, 2, {})
    revive()
    assert not old.exists() and (root / ".iter_0000002.replaced" / "weights").read_text() == "old"
    assert "recovered" in checkpointing.recover(root)
    assert (old / "weights").read_text() == "old" and hidden(root) == []
    staging.mkdir()
    (staging / "weights").write_text("new")
    checkpointing._publish(root, 2, {})
    assert (old / "weights").read_text() == "new" and hidden(root) == [] and (root / TRACKER).read_text() == "2"


# Item 5: convert_to_hf.py's swap, killed half-way.
def test_hf_swap_killed_between_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    from spiral_megatron.conversion import hf_io

    out, new = tmp_path / "hf", tmp_path / ".hf.zzzzzzzz"
    for folder, text in ((out, "old"), (new, "new")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    revive = killed_at_second_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        hf_io._swap_in(new, out)
    revive()
    assert not out.exists()
    hf_io.remove_stale_temporaries(out)  # what the next run does first
    assert (out / "config.json").read_text() == "old" and hidden(tmp_path) == []


# Item 9: a marker pointing at a damaged checkpoint is still an error.
@pytest.mark.parametrize("damage, message", [
    ("missing", "points at iteration 4 but iter_0000004 is missing (damaged checkpoint)"),
    ("garbage", "holds 'four', not an iteration number"),
    ("truncated", "iter_0000004 is not a complete Megatron distributed checkpoint (no valid metadata.json)"),
])
def test_damaged_checkpoint_is_an_error(reference, cache_dir, tmp_path, damage, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0] / "ckpt", ckpt)
    if damage == "missing":
        shutil.rmtree(ckpt / "iter_0000004")
    elif damage == "garbage":
        (ckpt / TRACKER).write_text("four")
    else:
        (ckpt / "iter_0000004" / "metadata.json").unlink()
    proc = launch(cache_dir, *TINY, "--load", ckpt, "--save", ckpt, expect_rc=2)
    assert message in proc.stderr and "resolved config" not in proc.stdout
