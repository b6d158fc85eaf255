"""Checkpoints: Megatron dist_checkpointing plus the files the converters read.

The folder layout, completeness, the record of who wrote a checkpoint and the publishing of a
save are in checkpoint_files.py. Each iteration folder also holds (the Hugging Face converter
depends on them):
    model_args.json   the architecture (spiral_megatron.model.model_args)
    config.yaml       the resolved TrainingConfig
    tokenizer/        tokenizer.json + tokenizer_config.json
State: `model` (the module's sharded_state_dict, so plain-tensor keys are parameter names),
`optimizer`, `scheduler`, `rng` (per rank), `iteration`, `consumed_samples`, `layout`, `config`.
A model-only checkpoint (what tools/convert_from_hf.py writes: `model` and model_args.json)
also loads: weights only, the optimizer and the LR schedule start fresh.

Saves may run in the background (`async_save`, Megatron's AsyncCallsQueue): publishing then
happens when every rank's write has finished. Restoring is in loading.py.
"""

import contextlib
import errno
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy
import torch
import torch.distributed as dist

from spiral_megatron.job.checkpoint import checkpoint_files, extra_state, scheduler_state, torch_adam
from spiral_megatron.job.build import Components, sync_params
from spiral_megatron.job.checkpoint.checkpoint_files import (TRACKER, CheckpointError, find_resumable,  # noqa: F401
                                                       iteration_dir, latest_iteration, recover)
from spiral_megatron.errors import ConfigError, SaveFailed, space_left  # noqa: F401 (SaveFailed read from here too)


def optimizer_format(cfg) -> dict:
    """The distributed optimizer's checkpoint format, chosen as Megatron-LM does: its default
    `dp_reshardable` (each rank writes its own buckets, no gather; reloads at the saved TP/PP
    only) or, with `dist_ckpt_optim_fully_reshardable`, `fully_reshardable` (gathered into
    parameter shapes; reloads at any layout). megatron-core's own default,
    "fully_sharded_model_space", needs flattened ShardedTensors, which 0.16 refuses."""
    fully = cfg is not None and cfg.dist_ckpt_optim_fully_reshardable
    return {"distrib_optim_sharding_type": "fully_reshardable" if fully else "dp_reshardable"}


def parallel_layout() -> dict:
    """This run's parallel layout: {"tp", "pp", "dp"} sizes."""
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def rng_object(layout: dict, state=None):
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


def set_rng(state: dict) -> None:
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
    A file-system error (full disk, broken mount) becomes SaveFailed, naming what is kept; so
    does a failed writer (megatron-core runs even a synchronous save's writers as workers, and
    every rank raises CheckpointException when it gathers their results: background_failure.py).
    """
    from torch.distributed.checkpoint import CheckpointException

    from spiral_megatron.job.checkpoint import background_failure

    try:
        return _save(root, iteration, consumed_samples, parts, cfg, tokenizer, background, extra)
    except CheckpointException as e:
        raise background_failure.translated(e, f"saving iteration {iteration} to {root}", kept(root),
                                            SaveFailed) from e
    except OSError as e:
        if isinstance(e, ConnectionError):  # a peer rank died: not this save's fault
            raise
        raise SaveFailed(f"saving iteration {iteration} failed: {e.strerror or e} "
                         f"({e.filename or 'no file named'}); the last complete checkpoint is still "
                         f"the latest: {kept(root)}") from e


def kept(root) -> str:
    """The latest complete checkpoint under `root`, in words, and the space left beside it (a
    writer that failed on a full disk says only "OSError")."""
    latest = latest_iteration(root)
    where = f"iteration {latest} in {root}" if latest is not None else f"none in {root}"
    return f"{where} ({space_left(root)})"


def _save(root, iteration, consumed_samples, parts, cfg, tokenizer, background, extra) -> Path:
    from megatron.core import dist_checkpointing

    from spiral_megatron.job.checkpoint import bucket_layout, optimizer_state

    staging = checkpoint_files.staging_dir(root, iteration)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted earlier save of this iteration
        staging.mkdir(parents=True)
    _barrier()
    layout = parallel_layout()
    sync_params(parts.model)  # the weights must be current: overlap_param_gather defers their all-gather
    model_sd = parts.module.sharded_state_dict()
    metadata = optimizer_format(cfg)
    state = {
        "model": model_sd,
        "optimizer": optimizer_state.sharded_state_dict(parts.optimizer, model_sd, metadata),
        "scheduler": scheduler_state.state_dict(parts.scheduler),
        "rng": rng_object(layout),
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
    distributed = bool(torch_adam.distributed_optimizers(parts.optimizer, any_backend=True))
    marker = checkpoint_files.record(iteration, layout, {
        "distributed": distributed,
        "format": metadata["distrib_optim_sharding_type"] if distributed else None,
        **({"buckets": bucket_layout.record(parts)} if distributed else {})})
    folder = iteration_dir(root, iteration)
    if background is None:
        _barrier()  # every rank's shard and every side file is written
        _publish(root, iteration, marker)
        return folder
    background.schedule(request, lambda: _publish(root, iteration, marker), folder)
    return folder


def _async_arguments(background) -> dict:
    """dist_checkpointing.save's arguments for a background save. megatron-core >= 0.19 defaults
    to NVIDIA Resiliency Extension's async writer; Megatron's own ("mcore") is the one whose
    request fits megatron.core's AsyncCallsQueue and whose helper `results_queue.for_saves` starts."""
    import inspect

    from megatron.core import dist_checkpointing

    if background is None:
        return {}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        return {"async_sharded_save": True, "async_strategy": "mcore"}
    return {"async_sharded_save": True}


def _publish(root, iteration: int, marker: dict) -> None:
    """Rank 0 publishes the staging folder (checkpoint_files.publish) that every rank has written."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        checkpoint_files.publish(root, iteration, marker)
    _barrier()


class BackgroundSaves:
    """Megatron's asynchronous checkpoint save (megatron.core's AsyncCallsQueue), as Megatron-LM's
    `--async-save`: tensors are written by a forked process (a copy-on-write snapshot of this
    step's state) while training goes on; each save is published when all ranks have written it.
    """

    def __init__(self, rank0: bool):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue, self.rank0, self.folders = AsyncCallsQueue(persistent=False), rank0, []

    def schedule(self, request, publish, folder: Path) -> None:
        def done():
            self.folders.remove(folder)
            publish()
            if self.rank0:
                print(f"saved checkpoint {folder}", flush=True)

        request.add_finalize_fn(done)
        self.folders.append(folder)
        self.queue.schedule_async_request(request)
        if self.rank0:
            print(f"saving checkpoint {folder} in the background", flush=True)

    def finalize(self, blocking: bool) -> None:
        """Publish the saves every rank has finished writing (all of them when `blocking`).
        A collective: every rank calls it at the same point. A save whose writer failed on any
        rank raises SaveFailed on every rank (background_failure.py)."""
        from torch.distributed.checkpoint import CheckpointException

        from spiral_megatron.job.checkpoint import background_failure

        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointException as e:
            raise background_failure.translated(e, f"the background save of {self.folders[0]}",
                                                kept(self.folders[0].parent), SaveFailed) from e

    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    def close(self) -> None:
        self.queue.close()


def check_writable(root) -> None:
    """A clear error before training when the save folder cannot be written."""
    root = Path(root)
    probe = root / f"{checkpoint_files.WRITE_TEST}{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
    except OSError as e:
        detail = f"; {space_left(root)}" if e.errno == errno.ENOSPC else ""
        raise ConfigError(f"save {str(root)!r} is not writable: {e.strerror or e}{detail}") from None
    finally:
        with contextlib.suppress(OSError):  # created empty on a full disk: not left behind
            probe.unlink(missing_ok=True)
