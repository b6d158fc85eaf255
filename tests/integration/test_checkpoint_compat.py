"""Checkpoints on every supported release and layout (issue 14 sections 1 and 3, issue 17):
what a `--load` folder holds decides between resuming, starting fresh and a one-line error;
a checkpoint this run cannot read is refused before anything is built; distributed-optimizer
state saved `fully_reshardable` resumes at another TP/PP layout; a checkpoint of the other
supported megatron-core release resumes (older -> newer) or is refused naming both.

The cross-release test needs the other release's Python: SPIRAL_OTHER_PYTHON (CI sets it).
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from spiral_megatron.job.checkpoint import checkpoint_files
from spiral_megatron.job.checkpoint.checkpoint_files import MARKER, TRACKER, CheckpointError
from tests.integration.conftest import TINY, checkpoint_at, launch, logged

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint

OTHER_PYTHON = os.environ.get("SPIRAL_OTHER_PYTHON")


def test_load_folders_that_are_not_checkpoints(reference, tmp_path):
    """An iteration folder, a Hugging Face folder or any other folder of files is an error
    naming what to pass; only an empty or missing --save folder starts fresh."""
    ckpt = reference[0] / "ckpt"
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (hf / name).write_text("{}")
    cases = {
        ckpt / "iter_0000004": f"it is one iteration's folder: pass the folder above it, {str(ckpt)!r}",
        hf: "it is a Hugging Face model folder: convert it first with `python tools/convert_from_hf.py",
        Path(__file__).parent: "the folder holds __init__.py, conftest.py,",
        tmp_path / "missing": "the folder does not exist (a new run: pass the same folder as --save)",
    }
    for load, message in cases.items():
        with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt") as error:
            checkpoint_files.find_resumable(load, save=tmp_path / "elsewhere")
        assert message in str(error.value), str(error.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".spiral_job.lock").write_text("{}")  # hidden files are ours: still empty
    assert checkpoint_files.find_resumable(empty, save=empty) is None
    assert checkpoint_files.find_resumable(tmp_path / "new", save=tmp_path / "new") is None
    with pytest.raises(CheckpointError, match="the folder is empty"):
        checkpoint_files.find_resumable(empty, save=None)


@pytest.mark.both_releases
def test_completeness_is_megatrons_check_plus_our_marker(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0] / "ckpt", ckpt)
    record = checkpoint_files.read_record(ckpt / "iter_0000004")
    assert record["iteration"] == 4 and record["megatron_core"] == checkpoint_files.megatron_core_version()
    assert record["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert record["optimizer"] == {"distributed": False, "format": None}
    assert checkpoint_files.find_resumable(ckpt, ckpt) == 4
    # No marker: a save never publishes such a folder (the marker is written before the rename),
    # so it is a checkpoint saved before the marker existed: complete only with all it wrote.
    folder = ckpt / "iter_0000004"
    (folder / MARKER).unlink()
    assert checkpoint_files.find_resumable(ckpt, ckpt) == 4
    assert checkpoint_files.read_record(folder) == dict(record, megatron_core=None, torch=None, pre_marker=True)
    shard = sorted(folder.glob("*.distcp"))[-1]
    size = shard.stat().st_size
    os.truncate(shard, size - 1)
    with pytest.raises(CheckpointError, match=rf"iter_0000004 lacks {MARKER}, which every save writes last, and "
                                              rf"is not a complete checkpoint of the format before it either "
                                              rf"\(shard {shard.name} is {size - 1} of {size} bytes\)"):
        checkpoint_files.find_resumable(ckpt, ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"\(shard {shard.name} is missing\): damaged or incomplete"):
        checkpoint_files.find_resumable(ckpt, ckpt)


# Keys this job's config gained with spiral_checkpoint.json (commit e4b01d9, after main of 2026-11-30).
NEWER_CONFIG_KEYS = ("dist_ckpt_optim_fully_reshardable", "no_load_optim", "no_load_rng")


def as_saved_before_the_marker(folder: Path) -> None:
    """`folder` as main of 2026-11-30 (32801ea) saved it: the same files without the marker, a
    config without the keys added since. Compared with that commit's own save of this job: the
    same file names, common-state keys, sharded keys, metadata.json and model_args.json. The
    config inside a megatron-core 0.19 checkpoint's common state keeps those keys (it is inside
    the distributed checkpoint); loading reads none of them."""
    import torch
    import yaml

    (folder / MARKER).unlink()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items()
                                                        if k not in NEWER_CONFIG_KEYS}, sort_keys=False))
    if (folder / "common.pt").is_file():  # megatron-core 0.16: the common state is a torch.save file
        common = torch.load(folder / "common.pt", weights_only=False)
        common["config"] = {k: v for k, v in common["config"].items() if k not in NEWER_CONFIG_KEYS}
        torch.save(common, folder / "common.pt")


@pytest.mark.both_releases
def test_a_checkpoint_saved_before_the_marker_resumes_exactly(reference, cache_dir, tmp_path):
    """Issue 21, item 4: refused as "damaged or incomplete" before; now proven complete and
    resumed: the losses of the uninterrupted run, bitwise."""
    _, full, _ = reference
    ckpt = checkpoint_at(reference[0] / "ckpt", 2, tmp_path / "ckpt")
    as_saved_before_the_marker(ckpt / "iter_0000002")
    proc = launch(cache_dir, *TINY, "--load", ckpt, "--save", ckpt, "--log-json", tmp_path / "b.jsonl")
    assert (f"load {str(ckpt)!r}: iteration 2 was saved before {MARKER} existed; it is complete "
            f"(Megatron's metadata, every shard, model_args.json)") in proc.stdout
    resumed = logged(tmp_path / "b.jsonl")
    assert sorted(resumed) == [3, 4]
    for it, record in resumed.items():
        assert (record["loss"], record["lr"]) == (full[it]["loss"], full[it]["lr"]), it


def write_record(folder: Path, **changes) -> None:
    record = dict(checkpoint_files.read_record(folder), **changes)
    (folder / MARKER).write_text(json.dumps(record))


def test_refused_before_loading_in_one_line(reference, cache_dir, tmp_path):
    """A newer release's checkpoint, dp_reshardable optimizer state at another TP/PP, or
    another kind of optimizer: one line naming both sides and what works, before building."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0] / "ckpt", ckpt)
    folder = ckpt / "iter_0000004"
    here = checkpoint_files.megatron_core_version()
    tp1 = {"tp": 1, "pp": 1, "dp": 1}
    write_record(folder, megatron_core="99.1.0")
    with pytest.raises(CheckpointError, match=rf"written by megatron-core 99.1.0; this is megatron-core {here}, "
                                              r"which cannot read a newer release's checkpoints"):
        checkpoint_files.check_fits(ckpt, 4, tp1, distributed_optimizer=False, load_optim=True)
    write_record(folder, megatron_core=here)
    with pytest.raises(CheckpointError, match="holds the state of the plain optimizer; this run uses the "
                                              "distributed optimizer. Pass --use-distributed-optimizer false"):
        checkpoint_files.check_fits(ckpt, 4, tp1, distributed_optimizer=True, load_optim=True)
    checkpoint_files.check_fits(ckpt, 4, tp1, distributed_optimizer=True, load_optim=False)
    # As a TP2 run with the distributed optimizer saves by default (Megatron-LM's dp_reshardable).
    write_record(folder, layout={"tp": 2, "pp": 1, "dp": 1},
                 optimizer={"distributed": True, "format": "dp_reshardable"})
    checkpoint_files.check_fits(ckpt, 4, {"tp": 2, "pp": 1, "dp": 4}, True, load_optim=True)  # DP reshards
    with pytest.raises(CheckpointError, match="saved at TP2 PP1 .* this run is TP2 PP2. Resume at TP2 PP1"):
        checkpoint_files.check_fits(ckpt, 4, {"tp": 2, "pp": 2, "dp": 1}, True, load_optim=True)
    checkpoint_files.check_fits(ckpt, 4, {"tp": 1, "pp": 1, "dp": 1}, True, load_optim=False)  # --no-load-optim
    proc = launch(cache_dir, *TINY, "--use-distributed-optimizer", "true", "--load", ckpt, "--save", ckpt,
                  expect_rc=2)
    line = (f"pretrain_spiral: error: load {str(ckpt)!r}: iter_0000004 holds distributed-optimizer state "
            f"saved at TP2 PP1 in Megatron's dp_reshardable format, which reloads only at TP2 PP1 (any DP); "
            f"this run is TP1 PP1. Resume at TP2 PP1, or pass --no-load-optim true")
    assert proc.stderr.strip().startswith(line) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "pipeline partition" not in proc.stdout  # refused before the model was built


def buckets_record(**changes) -> dict:
    """The optimizer entry of spiral_checkpoint.json as a PP2 dp_reshardable save of the debug
    flavor writes it (loop across stages, Megatron's default bucket size at DP 1)."""
    buckets = {"stages": ["prelude layer 0 + core replica", "core replica + coda layer 0"],
               "loop_placement": "across", "pipeline_split": [4, 2], "bucket_size": 40_000_000,
               "largest_first_stage_bucket": 120_000, **changes}
    return {"distributed": True, "format": "dp_reshardable", "buckets": buckets}


@pytest.mark.both_releases
def test_dp_reshardable_state_refused_where_its_buckets_change(reference, cache_dir, tmp_path):
    """Another loop placement or pipeline split (layers on other stages), or a bucket size that
    splits the first stage otherwise: one line naming both sides and what to pass, before
    anything is built (megatron-core: an AssertionError once built). What keeps every bucket
    (iterations moved between stages that both hold the core, a DP change below the bucket
    size) resumes; a checkpoint saved before the buckets were recorded is judged by its config."""
    from spiral_megatron.job.checkpoint import bucket_layout
    from spiral_megatron.job.settings.resolve import resolve

    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0] / "ckpt", ckpt)
    folder = ckpt / "iter_0000004"
    pp2 = ["--pipeline-parallel", "2", "--use-distributed-optimizer", "true"]
    write_record(folder, layout={"tp": 1, "pp": 2, "dp": 1}, optimizer=buckets_record())
    check = lambda *flags, dp=1: bucket_layout.check(ckpt, 4, resolve([*pp2, *flags]), dp)  # noqa: E731
    check()
    check("--model.pipeline_split", "2,4")  # the same layers on each stage
    check(dp=32)  # Megatron's bucket size stays 4e7 up to DP 40
    check(dp=64)  # 6.4e7: no bucket reached either size
    head = (f"load {str(ckpt)!r}: iter_0000004 holds distributed-optimizer state in Megatron's dp_reshardable "
            f"format, stored per DDP bucket, which reloads only into the same buckets: ")
    saved = ("saved with the pipeline stages [prelude layer 0 + core replica | core replica + coda layer 0] "
             "(model.loop_placement 'across', model.pipeline_split 4,2); ")
    resume = "Resume with --model.loop_placement across --model.pipeline_split 4,2, or pass --no-load-optim true"
    with pytest.raises(CheckpointError) as error:
        check("--model.loop_placement", "one-stage")
    assert str(error.value).startswith(head + saved + "this run's are [prelude layer 0 + core | coda layer 0] "
                                       "(model.loop_placement 'one-stage', model.pipeline_split 2,1). " + resume)
    with pytest.raises(CheckpointError, match=r"this run's are \[prelude layer 0 \| core \+ coda layer 0\]"):
        check("--model.pipeline_split", "1,5")
    check("--ddp-bucket-size", "200000")  # above the largest bucket either way: the same buckets
    with pytest.raises(CheckpointError, match="this run's are 100000 \\(--ddp-bucket-size\\)"):
        check("--ddp-bucket-size", "100000")
    # As spiral-410m's first stage: buckets closed at Megatron's 4e7, which DP 64 makes 6.4e7.
    write_record(folder, optimizer=buckets_record(largest_first_stage_bucket=40_000_512))
    with pytest.raises(CheckpointError) as error:
        check(dp=64)
    assert str(error.value).startswith(
        head + "saved with DDP buckets of 40000000 elements at DP 1 (its first stage's largest bucket 40000512); "
        "this run's are 64000000 (Megatron's default at DP 64), which would bucket the first pipeline stage's "
        "gradients otherwise. Resume with --ddp-bucket-size 40000000, or pass --no-load-optim true")
    check("--ddp-bucket-size", "40000000", dp=64)
    # Saved before the record held the buckets: the config's model fields and Megatron's default.
    write_record(folder, layout={"tp": 1, "pp": 2, "dp": 2}, optimizer={"distributed": True, "format": "dp_reshardable"})
    check(dp=4)
    with pytest.raises(CheckpointError, match=r"\(model.loop_placement 'across', model.pipeline_split 4,2\); "
                                              r"this run's are \[prelude layer 0 \+ core \| coda layer 0\]"):
        check("--model.loop_placement", "one-stage")
    with pytest.raises(CheckpointError, match=r"buckets of 40000000 elements at DP 2 \(Megatron's default at DP 2; "
                                              r"the checkpoint does not record its buckets\); this run's are 64000000"):
        check(dp=64)
    # The job refuses it in one line before building (a bucket size at TP1 PP1, one process).
    write_record(folder, layout={"tp": 1, "pp": 1, "dp": 1}, optimizer=buckets_record(
        stages=["prelude layer 0 + core + coda layer 0"], pipeline_split=[6], bucket_size=4000,
        largest_first_stage_bucket=4032))
    proc = launch(cache_dir, *TINY, "--use-distributed-optimizer", "true", "--load", ckpt, "--save", ckpt,
                  expect_rc=2)
    line = (f"pretrain_spiral: error: {head}saved with DDP buckets of 4000 elements at DP 1 (its first stage's "
            f"largest bucket 4032); this run's are 40000000 (Megatron's default at DP 1), which would bucket the "
            f"first pipeline stage's gradients otherwise. Resume with --ddp-bucket-size 4000, or pass "
            f"--no-load-optim true")
    assert proc.stderr.strip().startswith(line) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "pipeline partition" not in proc.stdout and "parameters" not in proc.stdout  # before building


@pytest.mark.both_releases
def test_fully_reshardable_distributed_optimizer_resumes_at_other_layouts(reference, cache_dir, tmp_path):
    """TP2 -> PP2 -> TP1 with the distributed optimizer, saved fully_reshardable: the losses of
    one uninterrupted single-process run, within TP/PP summation-order noise. The PP2 run
    replicates the core on both stages and splits the gradient buffer into many padded buckets
    (--ddp-bucket-size 4000): where megatron-core's own save misplaced the state
    (job/checkpoint/optimizer_state.py; tests/distributed/test_layouts.py reads such a save back)."""
    _, full, _ = reference
    save, args = tmp_path / "ckpt", (*TINY, "--use-distributed-optimizer", "true",
                                     "--dist-ckpt-optim-fully-reshardable", "true")
    launch(cache_dir, *args, "--tensor-parallel", 2, "--exit-interval", 2, "--save", save,
           "--log-json", tmp_path / "tp2.jsonl", nproc=2)
    record = checkpoint_files.read_record(save / "iter_0000002")["optimizer"]
    assert (record["distributed"], record["format"]) == (True, "fully_reshardable")
    launch(cache_dir, *args, "--pipeline-parallel", 2, "--ddp-bucket-size", 4000, "--exit-interval", 3,
           "--load", save, "--save", save, "--log-json", tmp_path / "pp2.jsonl", nproc=2)
    buckets = checkpoint_files.read_record(save / "iter_0000003")["optimizer"]["buckets"]
    assert buckets["stages"] == ["prelude layer 0 + core replica", "core replica + coda layer 0"], buckets
    assert buckets["bucket_size"] == 4000 and buckets["largest_first_stage_bucket"] >= 4000, buckets  # split by size
    proc = launch(cache_dir, *args, "--load", save, "--save", save, "--log-json", tmp_path / "tp1.jsonl")
    assert "at iteration 3 (12 samples consumed)" in proc.stdout and (save / TRACKER).read_text() == "4"
    assert "Warning" not in proc.stderr and "full_param_layout" not in proc.stderr, proc.stderr  # console.HARMLESS
    parts = [logged(tmp_path / f"{name}.jsonl") for name in ("tp2", "pp2", "tp1")]
    assert [sorted(p) for p in parts] == [[1, 2], [3], [4]]
    for it, record in {k: v for p in parts for k, v in p.items()}.items():
        assert record["lr"] == full[it]["lr"], it
        assert record["loss"] == pytest.approx(full[it]["loss"], rel=1e-5), it
        assert record["grad_norm"] == pytest.approx(full[it]["grad_norm"], rel=1e-4), it


@pytest.mark.both_releases
@pytest.mark.skipif(not OTHER_PYTHON, reason="SPIRAL_OTHER_PYTHON (the other megatron-core release) not set")
def test_checkpoints_across_releases(reference, cache_dir, tmp_path):
    """Saved by the older release, resumed by the newer: exact. Saved by the newer, loaded by
    the older: refused in one line naming both releases."""
    import subprocess

    _, full, _ = reference
    theirs = subprocess.run([OTHER_PYTHON, "-c", "from importlib.metadata import version; "
                             "print(version('megatron-core'))"], capture_output=True, text=True).stdout.strip()
    here = checkpoint_files.megatron_core_version()
    assert theirs and theirs != here, (theirs, here)
    older, newer = sorted([(OTHER_PYTHON, theirs), (os.sys.executable, here)],
                          key=lambda p: checkpoint_files._release(p[1]))
    save = tmp_path / "old"
    launch(cache_dir, *TINY, "--exit-interval", 2, "--save", save, "--log-json", tmp_path / "a.jsonl", python=older[0])
    launch(cache_dir, *TINY, "--load", save, "--save", save, "--log-json", tmp_path / "b.jsonl", python=newer[0])
    resumed = {**logged(tmp_path / "a.jsonl"), **logged(tmp_path / "b.jsonl")}
    assert sorted(resumed) == [1, 2, 3, 4]
    for it, record in resumed.items():
        assert (record["loss"], record["lr"]) == (full[it]["loss"], full[it]["lr"]), it
    assert checkpoint_files.read_record(save / "iter_0000004")["megatron_core"] == newer[1]
    proc = launch(cache_dir, *TINY, "--load", save, "--save", tmp_path / "other", python=older[0], expect_rc=2)
    assert (f"iter_0000004 was written by megatron-core {newer[1]}; this is megatron-core {older[1]}, which "
            f"cannot read a newer release's checkpoints") in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if (save / "iter_0000004" / "common.pt").is_file():
        return  # the newer release writes common.pt as 0.16 does: nothing more to check
    # Saved before the marker by megatron-core 0.19, loaded by 0.16: refused in one line too.
    as_saved_before_the_marker(save / "iter_0000004")
    proc = launch(cache_dir, *TINY, "--load", save, "--save", tmp_path / "other", python=older[0], expect_rc=2)
    assert (f"iter_0000004 was saved before {MARKER} existed, with its common state inside the distributed "
            f"checkpoint (megatron-core 0.19's format), which megatron-core {older[1]} cannot read") in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
