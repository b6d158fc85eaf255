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
"""

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy
import torch
import torch.distributed as dist

from spiral_megatron.training.build import Components, sync_params

TRACKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's format, as Megatron-LM's default: megatron-core 0.16's own
# default ("fully_sharded_model_space") needs flattened ShardedTensors, which its
# dist_checkpointing refuses. This one reloads at the same TP/PP layout only.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root) -> Optional[int]:
    """The iteration in the tracker file, or None where there is no complete checkpoint."""
    tracker = Path(root) / TRACKER
    return int(tracker.read_text().strip()) if tracker.is_file() else None


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


def save(root, iteration: int, consumed_samples: int, parts: Components, cfg, tokenizer) -> Path:
    """Save every rank's state, the side files, then move the tracker to `iteration`."""
    from megatron.core import dist_checkpointing

    folder = iteration_dir(root, iteration)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted earlier save of this iteration
        folder.mkdir(parents=True)
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
    }
    dist_checkpointing.save(state, str(folder))
    if rank0:
        parts.model_args.save(folder / "model_args.json")
        (folder / "config.yaml").write_text(cfg.to_yaml())
        if hasattr(tokenizer, "save"):
            tokenizer.save(folder / "tokenizer")
    _barrier()
    if rank0:  # the tracker moves only after every rank's shard and every file is written
        tmp = Path(root) / f".{TRACKER}.tmp"
        tmp.write_text(str(iteration))
        os.replace(tmp, Path(root) / TRACKER)
    _barrier()
    return folder


@dataclass
class Restored:
    """What `load` restored: the iteration, and the data position unless only weights were there."""

    iteration: int
    consumed_samples: Optional[int]
    weights_only: bool


def load(root, parts: Components) -> Restored:
    """Restore the latest checkpoint under `root`.

    The model reshards to this run's TP/PP layout, as does the non-distributed optimizer
    (its state tensors carry the model's keys); RNG states are restored only when the layout
    is the saved one. A model-only checkpoint (no optimizer tensors, no scheduler) restores
    the weights and leaves the freshly built optimizer and scheduler as they are.
    """
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"load {str(root)!r}: no {TRACKER} (no complete checkpoint)")
    folder = str(iteration_dir(root, iteration))
    common = dist_checkpointing.load_common_state_dict(folder)
    # Our saves put the scheduler in the common state; model-only checkpoints have none.
    # (The distributed optimizer's state is not plain tensors: tensor metadata cannot tell.)
    weights_only = "scheduler" not in common
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
    return Restored(iteration, common["consumed_samples"], False)


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
