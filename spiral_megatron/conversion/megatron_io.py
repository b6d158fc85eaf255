"""Reading and writing the training script's checkpoints, in one process without GPUs.

Layout (agreed with the training script):
    SAVE/latest_checkpointed_iteration.txt
    SAVE/iter_0000200/   Megatron dist checkpoint + model_args.json, config.yaml, tokenizer/
`dist_checkpointing` returns full tensors whatever TP/PP layout saved them.
"""

import re
import shutil
from pathlib import Path
from typing import Optional, Tuple

import torch

from spiral_megatron.conversion import mapping
from spiral_megatron.conversion.mapping import StateDict
from spiral_megatron.model.model_args import ModelArgs

MODEL_ROOTS = ("embedding", "prelude", "loop", "coda", "output_layer")  # model tensors
DROPPED_ROOTS = ("optimizer", "rng_state", "rerun_state_machine_state", "common_state")  # not weights: dropped
# A Megatron-Bridge checkpoint (spiral_megatron/bridge, docs/BRIDGE.md): its config file, and the
# field of its `model` section holding the model record (SpiralModelProvider.spiral_model_args).
BRIDGE_RUN_CONFIG, BRIDGE_RECORD = "run_config.yaml", "spiral_model_args"


def _read_errors() -> tuple:
    """What a bad checkpoint raises: torch's CheckpointException is a BaseException."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete or unreadable; the message says which."""


def iteration_dir(save: Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def find_checkpoint(load: str, iteration: Optional[int] = None) -> Tuple[Path, int]:
    """(the iteration's folder, iteration); the latest one unless `iteration` is given."""
    load = Path(load)
    if not load.is_dir():
        raise CheckpointError(f"checkpoint folder {str(load)!r} does not exist")
    if iteration is None:
        tracker = load / "latest_checkpointed_iteration.txt"
        if tracker.is_file():
            text = tracker.read_text().strip()
            if not text.isdigit():
                raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number")
            iteration = int(text)
        else:
            found = sorted(int(m.group(1)) for p in load.iterdir() if (m := re.fullmatch(r"iter_(\d+)", p.name)))
            if not found:
                raise CheckpointError(f"{str(load)!r} has no latest_checkpointed_iteration.txt and no iter_* folder")
            iteration = found[-1]
    folder = iteration_dir(load, iteration)
    if not folder.is_dir():
        have = sorted(p.name for p in load.glob("iter_*"))
        raise CheckpointError(f"no checkpoint at iteration {iteration} in {str(load)!r} (found: {have or 'none'})")
    return folder, iteration


def _ensure_process_group() -> None:
    """dist_checkpointing needs torch.distributed; a one-process gloo group is enough."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from spiral_megatron import parallel

        parallel.initialize(1, 1, backend="gloo")


def read_model_args(folder: Path) -> ModelArgs:
    """The model's record: model_args.json, or in a Megatron-Bridge checkpoint (run_config.yaml)
    the copy spiral_megatron.bridge's provider keeps in `model.spiral_model_args`."""
    path = Path(folder) / "model_args.json"
    if not path.is_file() and (Path(folder) / BRIDGE_RUN_CONFIG).is_file():
        return _bridge_model_args(Path(folder) / BRIDGE_RUN_CONFIG)
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no model_args.json (needed to know the architecture)")
    try:
        return ModelArgs.load(path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid ModelArgs JSON: {e}") from e


def _bridge_model_args(path: Path) -> ModelArgs:
    import yaml

    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    record = model.get(BRIDGE_RECORD)
    if record is None:
        raise CheckpointError(f"{path} has no model.{BRIDGE_RECORD}: not a SpiralFormer checkpoint of "
                              f"spiral_megatron.bridge (docs/BRIDGE.md)")
    try:
        return ModelArgs(**record).complete()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: model.{BRIDGE_RECORD} is not a valid record: {e}") from e


def read_tensors(folder: Path) -> StateDict:
    """Full model tensors of a dist checkpoint; optimizer/RNG state is dropped, anything
    else unknown is refused."""
    from megatron.core import dist_checkpointing

    _ensure_process_group()
    folder = Path(folder)
    try:
        meta = dist_checkpointing.load_tensors_metadata(str(folder))
    except _read_errors() as e:  # Megatron and torch raise many kinds; name the folder
        raise CheckpointError(f"{str(folder)!r} is not a readable Megatron dist checkpoint: {e}") from e
    roots = {key: re.split(r"[./]", key)[0] for key in meta}
    unknown = sorted(k for k, r in roots.items() if r not in MODEL_ROOTS + DROPPED_ROOTS)
    if unknown:
        raise CheckpointError(f"checkpoint tensors that are neither model nor optimizer state: {unknown[:10]}")
    wanted = {k: v for k, v in meta.items() if roots[k] in MODEL_ROOTS}
    try:
        loaded = dist_checkpointing.load(wanted, str(folder), validate_access_integrity=False)
    except _read_errors() as e:
        raise CheckpointError(f"checkpoint {str(folder)!r} could not be read (corrupt or truncated file?): {e}") from e
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def build_megatron(args: ModelArgs, **runtime):
    """A TP1 SpiralGPTModel on CPU for `args` (initialises a one-process group if needed)."""
    from spiral_megatron.model.model_args import build_model

    _ensure_process_group()
    runtime = {"use_cpu_initialization": True, "hidden_dropout": 0.0, "attention_dropout": 0.0, **runtime}
    return build_model(args, **runtime)


def write_checkpoint(save: str, iteration: int, args: ModelArgs, state: StateDict,
                     tokenizer=None, force: bool = False) -> Path:
    """A checkpoint of `state` (local per-layer names) in the training script's layout, written
    and published as the job's saves are (checkpoint_files): a kill leaves no half folder."""
    from spiral_megatron.job.checkpoint import checkpoint_files

    model = build_megatron(args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise ValueError(f"state does not fit the Megatron model: missing {missing}, unexpected {unexpected}")
    model.to(mapping.stored_dtype(state))  # stored as they came: a bf16 folder's weights stay bf16 (built fp32)

    def write_files(staging: Path) -> None:
        args.save(staging / "model_args.json")
        if tokenizer is not None:  # a folder, or its files
            files = sorted(Path(tokenizer).iterdir()) if isinstance(tokenizer, (str, Path)) else tokenizer
            (staging / "tokenizer").mkdir()
            for file in files:
                shutil.copyfile(file, staging / "tokenizer" / Path(file).name)

    return checkpoint_files.write_model_only(save, iteration, model, write_files, force)


def model_state(model) -> StateDict:
    """A Megatron module's weights (no `_extra_state`), detached, on CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("._extra_state")}

