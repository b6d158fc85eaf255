"""Checkpoints: Megatron dist_checkpointing plus the files the converters read.

Layout (the Hugging Face converter depends on it):
    SAVE/latest_checkpointed_iteration.txt   the iteration, written (atomic rename) last
    SAVE/iter_0000200/                        Megatron dist checkpoint of the state below
    SAVE/iter_0000200/model_args.json         the architecture (spiral_megatron.model_args)
    SAVE/iter_0000200/config.yaml             the resolved TrainingConfig
    SAVE/iter_0000200/tokenizer/              tokenizer.json + tokenizer_config.json
State: `model` (the module's sharded_state_dict, so plain-tensor keys are parameter names),
`optimizer`, `scheduler`, `rng` (per rank), `iteration`, `consumed_samples`, `layout`, `config`.
A model-only checkpoint (what tools/convert_from_hf.py writes: `model` and model_args.json)
also loads: weights only, the optimizer and the LR schedule start fresh.

Nothing complete is deleted before its replacement is complete: a save writes into the hidden
`SAVE/.iter_0000200.saving/`, then renames it in (an older folder of the same iteration is
renamed aside to `.iter_0000200.replaced/` first and deleted last), then moves the marker. A
kill between the two renames leaves the marker's folder under its `.replaced` name, which
`recover` renames back. Saves may run in the background (`async_save`, Megatron's
AsyncCallsQueue): the renames and the marker then happen when every rank's write has finished.
"""

import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy
import torch
import torch.distributed as dist

from spiral_megatron.training import extra_state
from spiral_megatron.training.build import Components, sync_params
from spiral_megatron.training.config import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's format, as Megatron-LM's default: megatron-core 0.16's own
# default ("fully_sharded_model_space") needs flattened ShardedTensors, which its
# dist_checkpointing refuses. This one reloads at the same TP/PP layout only.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
STAGING, REPLACED = ".saving", ".replaced"  # suffixes of hidden folders next to iter_*


class CheckpointError(ConfigError):
    """A checkpoint folder whose marker or iteration folder is damaged; the message says which."""


def iteration_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _hidden(root, iteration: int, suffix: str) -> Path:
    return Path(root) / f".{iteration_dir(root, iteration).name}{suffix}"


def latest_iteration(root) -> Optional[int]:
    """The iteration in the tracker file, or None where there is no complete checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"load {str(root)!r}: {TRACKER} holds {text[:40]!r}, not an iteration number")
    return int(text)


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


def find_resumable(load, save) -> Optional[int]:
    """The iteration to resume from, or None to start from scratch (Megatron-LM's rule).

    No marker (a folder never saved into, or whose first save was killed) means no complete
    checkpoint: start from scratch, as Megatron-LM does; except a `load` folder that does not
    exist and is not the `save` folder (a mistyped path: an error). A marker that is not a
    number, or points at a missing or incomplete folder, is an error naming what is wrong.
    """
    root = Path(load)
    iteration = latest_iteration(root)
    if iteration is None:
        if not root.exists() and (save is None or Path(save).resolve() != root.resolve()):
            raise FileNotFoundError(f"load {str(load)!r}: no {TRACKER} (no complete checkpoint); "
                                    f"the folder does not exist")
        return None
    folder = iteration_dir(root, iteration)
    if not folder.is_dir():
        raise CheckpointError(f"load {str(load)!r}: {TRACKER} points at iteration {iteration} but "
                              f"{folder.name} is missing (damaged checkpoint)")
    files = ("metadata.json", ".metadata", "common.pt", "model_args.json")  # what every save writes
    missing = [n for n in files if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"load {str(load)!r}: {folder.name} lacks {', '.join(missing)} "
                              f"(damaged or incomplete checkpoint)")
    return iteration


def start_save_helper() -> None:
    """Start Megatron's checkpoint-writing helper now, with SIGTERM ignored in it.

    dist_checkpointing's writer reports through a queue served by a `spawn`ed manager process,
    started at the first save and reused after. That process ignores SIGINT but not SIGTERM,
    so a SIGTERM sent to the whole process group (SLURM preemption, `scancel`, torchrun's
    agent) killed it, and the exit save then failed with BrokenPipeError. A spawned child
    inherits an ignored signal: start it while SIGTERM is ignored, before our own handler.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = getattr(filesystem_async, "get_write_results_queue", None)  # megatron-core >= 0.17
    queue = queue or getattr(filesystem_async, "_get_write_results_queue")  # 0.16
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        queue()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_object(layout: dict, state=None):
    """This rank's RNG states as one ShardedObject of a (pp, tp, dp) grid."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if state is None:
        state = {"random": random.getstate(), "numpy": numpy.random.get_state(),
                 "torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    return ShardedObject(
        "rng_state", state, (layout["pp"], layout["tp"], layout["dp"]),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
         ps.get_data_parallel_rank()), replica_id=0,
    )


def _set_rng(state: dict) -> None:
    random.setstate(state["random"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(root, iteration: int, consumed_samples: int, parts: Components, cfg, tokenizer,
         background=None, extra: Optional[dict] = None) -> Path:
    """Save every rank's state into a staging folder, then publish it (`_publish`).

    With `background` (a BackgroundSaves), Megatron writes the tensors in a forked process
    and the publishing waits for `background.finalize`; else it happens before returning.
    `extra` goes into the common state (e.g. the last step's loss, for the NaN message).
    """
    from megatron.core import dist_checkpointing

    staging = _hidden(root, iteration, STAGING)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted earlier save of this iteration
        staging.mkdir(parents=True)
    _barrier()
    layout = _layout()
    sync_params(parts.model)  # the weights must be current: overlap_param_gather defers their all-gather
    model_sd = parts.module.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": parts.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMAT),
        "scheduler": parts.scheduler.state_dict(),
        "rng": _rng_object(layout),
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "layout": layout,
        "config": cfg.to_dict(),
        "extra": extra or {},
    }
    request = dist_checkpointing.save(state, str(staging), **_async_arguments(background))
    extra_state.save(parts.module, staging)  # e.g. a quantized model's modelopt state (QAT)
    if rank0:
        parts.model_args.save(staging / "model_args.json")
        (staging / "config.yaml").write_text(cfg.to_yaml())
        if hasattr(tokenizer, "save"):
            tokenizer.save(staging / "tokenizer")
    folder = iteration_dir(root, iteration)
    if background is None:
        _barrier()  # every rank's shard and every side file is written
        _publish(root, iteration)
        return folder
    background.schedule(request, lambda: _publish(root, iteration), folder)
    return folder


def _async_arguments(background) -> dict:
    """dist_checkpointing.save's arguments for a background save. megatron-core >= 0.19 defaults
    to NVIDIA Resiliency Extension's async writer; Megatron's own ("mcore") is the one whose
    request fits megatron.core's AsyncCallsQueue and whose helper `start_save_helper` starts."""
    import inspect

    from megatron.core import dist_checkpointing

    if background is None:
        return {}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        return {"async_sharded_save": True, "async_strategy": "mcore"}
    return {"async_sharded_save": True}


def _publish(root, iteration: int) -> None:
    """Rank 0 renames the complete staging folder in, then moves the tracker to `iteration`."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        folder = iteration_dir(root, iteration)
        replaced = _hidden(root, iteration, REPLACED)
        if folder.exists():  # e.g. a fresh run saving into an old run's folder
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(folder, replaced)
        os.replace(_hidden(root, iteration, STAGING), folder)
        tmp = Path(root) / f".{TRACKER}.tmp"
        tmp.write_text(str(iteration))
        os.replace(tmp, Path(root) / TRACKER)
        shutil.rmtree(replaced, ignore_errors=True)
    _barrier()


class BackgroundSaves:
    """Megatron's asynchronous checkpoint save (megatron.core's AsyncCallsQueue), as Megatron-LM's
    `--async-save`: tensors are written by a forked process (a copy-on-write snapshot of this
    step's state) while training goes on; each save is published when all ranks have written it.
    """

    def __init__(self, rank0: bool):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue, self.rank0 = AsyncCallsQueue(persistent=False), rank0

    def schedule(self, request, publish, folder: Path) -> None:
        def done():
            publish()
            if self.rank0:
                print(f"saved checkpoint {folder}", flush=True)

        request.add_finalize_fn(done)
        self.queue.schedule_async_request(request)
        if self.rank0:
            print(f"saving checkpoint {folder} in the background", flush=True)

    def finalize(self, blocking: bool) -> None:
        """Publish the saves every rank has finished writing (all of them when `blocking`).
        A collective: every rank calls it at the same point."""
        self.queue.maybe_finalize_async_calls(blocking=blocking)

    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    def close(self) -> None:
        self.queue.close()


@dataclass
class Restored:
    """What `load` restored: the iteration, and the data position unless only weights were there."""

    iteration: int
    consumed_samples: Optional[int]
    weights_only: bool
    extra: Optional[dict] = None


def load(root, parts: Components, cfg=None, tokenizer=None) -> Restored:
    """Restore the latest checkpoint under `root`, after checking it fits this run.

    The model reshards to this run's TP/PP layout, as does the non-distributed optimizer
    (its state tensors carry the model's keys); RNG states are restored only when the layout
    is the saved one. A model-only checkpoint (no optimizer tensors, no scheduler) restores
    the weights and leaves the freshly built optimizer and scheduler as they are. Another
    architecture, sequence length, tokenizer or LR schedule is refused first (resume_check).
    """
    from megatron.core import dist_checkpointing

    from spiral_megatron.model_args import ModelArgs
    from spiral_megatron.training import resume_check

    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"load {str(root)!r}: no {TRACKER} (no complete checkpoint)")
    folder = str(iteration_dir(root, iteration))
    common = dist_checkpointing.load_common_state_dict(folder)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    weights_only = "scheduler" not in common
    resume_check.check_model(Path(folder), ModelArgs.load(Path(folder) / "model_args.json"),
                             parts.model_args, tokenizer, weights_only)
    if not weights_only and cfg is not None:
        for line in (resume_check.check_schedule(Path(folder), common["scheduler"], parts.scheduler, cfg),
                     resume_check.other_differences(common.get("config"), cfg)):
            if line and rank0:
                print(line, flush=True)
    model_sd = parts.module.sharded_state_dict()
    request = {"model": model_sd}
    if not weights_only:
        _prepare_state_for_loading(parts.optimizer)
        request["optimizer"] = parts.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                  metadata=OPTIMIZER_FORMAT)
    same_layout = common.get("layout") == _layout()
    if same_layout:
        request["rng"] = _rng_object(common["layout"], state={})
    state = dist_checkpointing.load(request, folder)
    parts.module.load_state_dict(state["model"])
    if weights_only:
        return Restored(iteration, None, True)
    with torch.no_grad():  # fp32 training: the distributed optimizer's shards view the parameters
        parts.optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(parts.optimizer)
    parts.scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng(state["rng"])
    return Restored(iteration, common["consumed_samples"], False, common.get("extra", {}))


def _torch_adam_distributed(optimizer):
    """The DistributedOptimizers of `optimizer` that run torch's Adam (no apex/TE, e.g. CPU)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt, distrib_optimizer.DistributedOptimizer)]


def _prepare_state_for_loading(optimizer) -> None:
    """Megatron 0.16's DistributedOptimizer over torch's Adam has no state to load into before
    its first step: give it Megatron's own dummy state (a zero-gradient step; the parameters
    it touches are overwritten by the load that follows)."""
    for opt in _torch_adam_distributed(optimizer):
        if not opt.optimizer.state:
            with torch.no_grad():
                opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """After loading, torch's Adam keeps the dummy step count (1) in its per-parameter state;
    the checkpoint's count is in the param groups (Megatron stores it there): copy it back,
    or the bias correction of the next step is wrong and the resume is not exact."""
    for opt in _torch_adam_distributed(optimizer):
        for group in opt.optimizer.param_groups:
            if "step" in group:
                for param in group["params"]:
                    if param in opt.optimizer.state:
                        opt.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))


def check_writable(root) -> None:
    """A clear error before training when the save folder cannot be written."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"save {str(root)!r} is not writable: {e.strerror or e}") from None
