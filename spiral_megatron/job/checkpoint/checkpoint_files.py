"""A checkpoint folder's files: which iteration is the latest, whether it is complete, who wrote
it, and the one way a checkpoint folder is written (staging, then publishing). No torch state.

    SAVE/latest_checkpointed_iteration.txt   the iteration, moved (atomic rename) last
    SAVE/iter_0000200/                        Megatron dist checkpoint, plus the files below
    SAVE/iter_0000200/spiral_checkpoint.json  this project's record (MARKER), written last

A folder is complete when megatron-core's public `check_is_distributed_checkpoint` accepts it
and MARKER is there: MARKER is written by rank 0 once every rank's shards and every side file
are written, so no file list of one megatron-core release is needed (0.16 writes `common.pt`,
0.19 keeps the common state inside the distributed checkpoint). MARKER records the
megatron-core release, the parallel layout and the optimizer state's format, so a checkpoint
that cannot load here is refused before anything is built, in one line (`check_fits`).

Nothing complete is deleted before its replacement is complete: a save writes into the hidden
`SAVE/.iter_0000200.saving/`, then `publish` renames it in (an older folder of the same
iteration is renamed aside to `.iter_0000200.replaced/` first and deleted last), then moves
the tracker. A kill between the two renames leaves the tracker's folder under its `.replaced`
name, which `recover` renames back.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from spiral_megatron.errors import SaveFailed, space_left
from spiral_megatron.job.checkpoint.errors import CheckpointError, megatron_core_version  # noqa: F401 (read from here too)

TRACKER = "latest_checkpointed_iteration.txt"
TRACKER_TMP = f".{TRACKER}.tmp"
WRITE_TEST = ".write_test_"  # checkpointing.check_writable's probe file, + the pid
MARKER = "spiral_checkpoint.json"
STAGING, REPLACED = ".saving", ".replaced"  # suffixes of hidden folders next to iter_*
ITERATION = re.compile(r"iter_(\d{7})")


def iteration_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def staging_dir(root, iteration: int) -> Path:
    return _hidden(root, iteration, STAGING)


def _hidden(root, iteration: int, suffix: str) -> Path:
    return Path(root) / f".{iteration_dir(root, iteration).name}{suffix}"


def record(iteration: int, layout: Optional[dict], optimizer: Optional[dict]) -> dict:
    """MARKER's content. `optimizer`: None (weights only) or {"distributed": bool, "format": str}."""
    import torch

    return {"iteration": iteration, "megatron_core": megatron_core_version(), "torch": torch.__version__,
            "layout": layout, "optimizer": optimizer}


def read_record(folder) -> dict:
    """MARKER's content; for a checkpoint saved before MARKER existed, what it would say
    (old_checkpoints.py)."""
    folder = Path(folder)
    if not (folder / MARKER).exists() and ITERATION.fullmatch(folder.name):
        from spiral_megatron.job.checkpoint import old_checkpoints

        return old_checkpoints.derived_record(folder, int(folder.name[5:]))
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(Path(folder) / MARKER)!r} cannot be read ({e}): damaged checkpoint") from None


def same_folder(a, b) -> bool:
    """Whether paths `a` and `b` name one folder (--load and --save spelled differently)."""
    return Path(a).resolve() == Path(b).resolve()


def latest_iteration(root) -> Optional[int]:
    """The iteration in the tracker file, or None where there is no complete checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"load {str(root)!r}: {TRACKER} holds {text[:40]!r}, not an iteration number")
    return int(text)


def holds_job_checkpoint(root) -> bool:
    """Whether `root`'s latest checkpoint is this project's job's (its model_args.json, no
    Megatron-Bridge run_config.yaml): Bridge's pretrain() cannot read it."""
    iteration = latest_iteration(root)
    if iteration is None:
        return False
    folder = iteration_dir(root, iteration)
    return (folder / "model_args.json").is_file() and not (folder / "run_config.yaml").exists()


def publish(root, iteration: int, marker: dict) -> None:
    """Rank 0, once every rank has written the staging folder: write MARKER into it, rename it
    in, then move the tracker to `iteration`."""
    staging, folder = staging_dir(root, iteration), iteration_dir(root, iteration)
    _write_durably(staging / MARKER, json.dumps(marker, indent=1))
    replaced = _hidden(root, iteration, REPLACED)
    if folder.exists():  # e.g. a fresh run saving into an old run's folder
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(folder, replaced)
    os.replace(staging, folder)
    tmp = Path(root) / TRACKER_TMP
    _write_durably(tmp, str(iteration))
    os.replace(tmp, Path(root) / TRACKER)
    _sync_folder(root)  # the renames themselves, before anything is deleted
    shutil.rmtree(replaced, ignore_errors=True)


def _write_durably(path: Path, text: str) -> None:
    """Write `path` and flush it to the disk (a lost node must not leave an empty tracker)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(fd)


def write_model_only(root, iteration: int, module, write_files: Callable[[Path], None],
                     force: bool = False) -> Path:
    """A weights-only checkpoint of a one-process `module` (what the converters and
    tools/quantize.py write), staged and published as the job's saves are: a kill leaves no
    half folder. `write_files(staging)` adds the side files (model_args.json, tokenizer, ...)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import CheckpointException

    from spiral_megatron.job.checkpoint import results_queue
    from spiral_megatron.job.checkpoint.background_failure import describe

    folder = iteration_dir(root, iteration)
    if folder.exists() and any(folder.iterdir()) and not force:
        raise FileExistsError(f"{str(folder)!r} is not empty; pass --force to overwrite it")
    recover(root)  # what a killed earlier run left
    staging = staging_dir(root, iteration)
    staging.mkdir(parents=True)
    results_queue.in_this_process(replace=False)  # a one-process synchronous save: no helper process
    try:
        dist_checkpointing.save({"model": module.sharded_state_dict()}, str(staging))
        write_files(staging)
    except (CheckpointException, OSError) as e:  # a full disk, a broken mount: nothing half-written stays
        left = space_left(root)  # before what was written is deleted
        shutil.rmtree(staging, ignore_errors=True)
        cause = describe(e) if isinstance(e, CheckpointException) else f"{type(e).__name__}: {e}"
        raise SaveFailed(f"writing {folder} failed ({cause}); {left}; "
                         f"{root} holds what it held before") from e
    publish(root, iteration, record(iteration, {"tp": 1, "pp": 1, "dp": 1}, optimizer=None))
    return folder


def recover(root) -> Optional[str]:
    """Undo what a kill in the middle of publishing a save left (rank 0, lock held).

    Stale `.saving` folders are deleted (their save never completed). A `.replaced` folder is
    renamed back when its iteration's folder is missing (killed between the two renames: it
    is the only complete copy), else deleted. Returns a line to print, or None.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    for stale in root.glob(f".iter_*{STAGING}"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in [root / TRACKER_TMP, *root.glob(f"{WRITE_TEST}*")]:  # files a kill left
        stale.unlink(missing_ok=True)
    restored = []
    for old in sorted(root.glob(f".iter_*{REPLACED}")):
        folder = root / old.name[1:-len(REPLACED)]
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, folder)
            restored.append(str(folder))
    if restored:
        return f"recovered {', '.join(restored)} (a save was killed while replacing it)"
    return None


def find_resumable(load, save, job_files=()) -> Optional[int]:
    """The iteration to resume from, or None to start from scratch.

    Only a `load` folder that is also the `save` folder and holds nothing but what the job
    writes before its first checkpoint (`job_files`: config.yaml, warnings.log, ...; hidden
    files; iteration folders newer than a missing tracker) starts fresh: the first launch of a
    requeued job, or one killed before its first checkpoint. A folder that holds other files
    but no tracker (an iteration folder, a Hugging Face folder, a mistyped path) is an error
    saying what it holds and what to pass instead; so is a tracker that is not a number or
    points at a missing or incomplete folder.
    """
    root = Path(load)
    iteration = latest_iteration(root)
    if iteration is None:
        contents = sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
        is_save = save is not None and same_folder(save, root)
        if is_save and all(ITERATION.fullmatch(name) or name in job_files for name in contents):
            return None  # never saved into, or killed before the tracker first moved
        raise CheckpointError(_not_a_checkpoint(load, root, contents))
    folder = iteration_dir(root, iteration)
    if not folder.is_dir():
        raise CheckpointError(f"load {str(load)!r}: {TRACKER} points at iteration {iteration} but "
                              f"{folder.name} is missing (damaged checkpoint)")
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(str(folder)):
        raise CheckpointError(f"load {str(load)!r}: {folder.name} is not a complete Megatron distributed "
                              f"checkpoint (no valid metadata.json): damaged or incomplete")
    if not (folder / MARKER).is_file():  # saved before MARKER existed, or damaged
        from spiral_megatron.job.checkpoint.old_checkpoints import missing_parts

        missing = missing_parts(folder)
        if missing:
            raise CheckpointError(f"load {str(load)!r}: {folder.name} lacks {MARKER}, which every save writes "
                                  f"last, and is not a complete checkpoint of the format before it either "
                                  f"({missing}): damaged or incomplete")
    return iteration


def _not_a_checkpoint(load, root: Path, contents: list) -> str:
    head = f"load {str(load)!r}: no {TRACKER}, so no checkpoint to resume"
    if not root.exists():
        return f"{head}; the folder does not exist (a new run: pass the same folder as --save)"
    if not contents:
        return f"{head}; the folder is empty (a new run: pass the same folder as --save)"
    if ITERATION.fullmatch(root.name) or (root / MARKER).is_file() or (root / "metadata.json").is_file():
        return f"{head}; it is one iteration's folder: pass the folder above it, {str(root.parent)!r}"
    if (root / "config.json").is_file() and any(n.endswith(".safetensors") or n.endswith(".bin") for n in contents):
        return (f"{head}; it is a Hugging Face model folder: convert it first with "
                f"`python tools/convert_from_hf.py --load {load} --save FOLDER`, then pass --load FOLDER")
    shown = ", ".join(contents[:5]) + (f" and {len(contents) - 5} more" if len(contents) > 5 else "")
    return f"{head}; the folder holds {shown}: pass the folder a training run saved into (--save)"


def check_fits(load, iteration: int, layout: dict, distributed_optimizer: bool, load_optim: bool) -> dict:
    """Refuse, before loading, a checkpoint this run cannot read: one written by a newer
    megatron-core, or distributed-optimizer state whose format does not reshard to this run's
    TP/PP layout (Megatron-LM's rule) or optimizer. `layout`: this run's {"tp", "pp", "dp"}.
    Returns the checkpoint's record (read_record)."""
    folder = iteration_dir(load, iteration)
    saved = read_record(folder)  # pre-marker: its common state was just read, so this release reads it
    here, theirs = megatron_core_version(), saved["megatron_core"]
    if theirs is not None and _release(theirs) > _release(here):
        raise CheckpointError(
            f"load {str(load)!r}: {folder.name} was written by megatron-core {theirs}; this is megatron-core "
            f"{here}, which cannot read a newer release's checkpoints. Resume with megatron-core >= "
            f"{'.'.join(map(str, _release(theirs)))}, or carry the weights over through Hugging Face "
            f"(tools/convert_to_hf.py there, tools/convert_from_hf.py here)")
    optimizer = saved["optimizer"]
    if not load_optim or optimizer is None:
        return saved
    shown = lambda lay: f"TP{lay['tp']} PP{lay['pp']}"  # noqa: E731
    if optimizer["distributed"] != distributed_optimizer:
        kind = {True: "the distributed optimizer", False: "the plain optimizer"}
        raise CheckpointError(
            f"load {str(load)!r}: {folder.name} holds the state of {kind[optimizer['distributed']]}; this run "
            f"uses {kind[distributed_optimizer]}. Pass --use-distributed-optimizer "
            f"{str(optimizer['distributed']).lower()}, or --no-load-optim true to start the optimizer fresh")
    same = (saved["layout"]["tp"], saved["layout"]["pp"]) == (layout["tp"], layout["pp"])
    if optimizer["distributed"] and optimizer["format"] == "dp_reshardable" and not same:
        raise CheckpointError(
            f"load {str(load)!r}: {folder.name} holds distributed-optimizer state saved at "
            f"{shown(saved['layout'])} in Megatron's dp_reshardable format, which reloads only at "
            f"{shown(saved['layout'])} (any DP); this run is {shown(layout)}. Resume at "
            f"{shown(saved['layout'])}, or pass --no-load-optim true (weights, LR schedule and data "
            f"position; fresh Adam moments); saves with --dist-ckpt-optim-fully-reshardable true reload "
            f"at any layout")
    return saved


def _release(version: str) -> tuple:
    """(major, minor) of a version string: Megatron changes checkpoint formats between minors."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])
