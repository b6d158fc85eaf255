"""Checkpoints saved before `spiral_checkpoint.json` existed (this repository's main up to
2026-11-30, commit 32801ea): they load, once proven complete.

That job wrote the same folders as today's, minus the marker: a Megatron dist checkpoint
(megatron-core 0.16: `common.pt` beside it; 0.19: the common state inside it) with
`model_args.json`, `config.yaml` and `tokenizer/`, staged in `.iter_N.saving/`, renamed in
once every rank had written it, and the tracker moved last. So such a folder is complete when
megatron-core's `check_is_distributed_checkpoint` accepts it, torch's `.metadata` (written
once every rank's shards are) lists only shard files that are there with all their bytes, and
`model_args.json` is there. What the marker would say is read from the checkpoint itself: the
layout and the optimizer's kind from its common state (that job always saved the distributed
optimizer in Megatron's `dp_reshardable` format).
"""

from pathlib import Path
from typing import Optional


def missing_parts(folder: Path) -> Optional[str]:
    """What an old-format `folder` lacks to be complete, or None when it is complete."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    if not dist_checkpointing.check_is_distributed_checkpoint(str(folder)):
        return "no valid metadata.json"
    if not (folder / "model_args.json").is_file():
        return "no model_args.json"
    try:
        storage = FileSystemReader(str(folder)).read_metadata().storage_data
    except Exception as e:  # noqa: BLE001 - torch raises whatever its unpickler meets
        return f"torch's .metadata cannot be read ({type(e).__name__})"
    needed = {}  # shard file -> bytes its entries need
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = (folder / name).stat().st_size if (folder / name).is_file() else None
        if have is None or have < size:
            return f"shard {name} is {'missing' if have is None else f'{have} of {size} bytes'}"
    return None


def derived_record(folder: Path, iteration: int) -> dict:
    """What spiral_checkpoint.json would hold (checkpoint_files.record), from the checkpoint."""
    from megatron.core import dist_checkpointing

    from spiral_megatron.job.checkpoint.errors import CheckpointError, megatron_core_version

    try:
        common = dist_checkpointing.load_common_state_dict(str(folder))
    except Exception as e:  # noqa: BLE001 - whichever way this release fails to read it
        where = ("in common.pt" if (folder / "common.pt").is_file() else
                 "inside the distributed checkpoint (megatron-core 0.19's format)")
        raise CheckpointError(
            f"load {str(folder.parent)!r}: {folder.name} was saved before spiral_checkpoint.json existed, "
            f"with its common state {where}, which megatron-core {megatron_core_version()} cannot read "
            f"({type(e).__name__}); resume with the megatron-core release that saved it") from None
    if "scheduler" not in common:  # weights only (the converters): one process wrote it
        return {"iteration": iteration, "megatron_core": None, "torch": None,
                "layout": {"tp": 1, "pp": 1, "dp": 1}, "optimizer": None, "pre_marker": True}
    distributed = bool((common.get("config") or {}).get("use_distributed_optimizer"))
    return {"iteration": iteration, "megatron_core": None, "torch": None, "layout": common["layout"],
            "optimizer": {"distributed": distributed, "format": "dp_reshardable" if distributed else None},
            "pre_marker": True}
