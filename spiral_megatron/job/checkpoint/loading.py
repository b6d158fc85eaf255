"""Restoring a run from its latest checkpoint (checkpointing.py saves it): the model resharded
to this run's layout, the optimizer in its saved format, the LR schedule, the RNG states and
the data position, after checking that the checkpoint fits this run (resume_check.py)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from spiral_megatron.job.build import Components, create_adam_state
from spiral_megatron.job.checkpoint import checkpoint_files, scheduler_state, torch_adam
from spiral_megatron.job.checkpoint.checkpoint_files import TRACKER, CheckpointError, iteration_dir, latest_iteration
from spiral_megatron.job.checkpoint.checkpointing import parallel_layout, rng_object, set_rng


@dataclass
class Restored:
    """What `load` restored: the iteration, and the data position unless only weights were there."""

    iteration: int
    consumed_samples: Optional[int]
    weights_only: bool
    extra: Optional[dict] = None


def load(root, parts: Components, cfg=None, tokenizer=None, finetune: bool = False) -> Restored:
    """Restore the latest checkpoint under `root`, after checking it fits this run.

    The model reshards to this run's TP/PP layout, as does the optimizer state (the plain
    optimizer's and `fully_reshardable` state carry the model's keys; `dp_reshardable` state
    was refused before this if the TP/PP layout changed: checkpoint_files.check_fits). RNG
    states are restored only when the layout is the saved one. A model-only checkpoint (no
    optimizer tensors, no scheduler) restores the weights and leaves the freshly built
    optimizer and scheduler as they are, the optimizer's main copies (bf16/fp16) taken from the
    loaded weights; so does `no_load_optim` for the optimizer (Megatron-LM's flag; our choice:
    the LR schedule and the data position still continue). `finetune` (Megatron-LM's
    --finetune): weights only, whatever the checkpoint holds. Another
    architecture, sequence length, tokenizer or LR schedule is refused first (resume_check).
    """
    from megatron.core import dist_checkpointing

    from spiral_megatron.model.model_args import ModelArgs
    from spiral_megatron.job.checkpoint import optimizer_state, resume_check

    iteration = latest_iteration(root)
    if iteration is None:
        raise CheckpointError(f"load {str(root)!r}: no {TRACKER} (no complete checkpoint)")
    folder = str(iteration_dir(root, iteration))
    record = checkpoint_files.read_record(folder)
    common = dist_checkpointing.load_common_state_dict(folder)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    weights_only = finetune or "scheduler" not in common
    resume_check.check_model(Path(folder), ModelArgs.load(Path(folder) / "model_args.json"),
                             parts.model_args, tokenizer, weights_only)
    if not weights_only and cfg is not None:
        for line in (resume_check.check_schedule(Path(folder), common["scheduler"], parts.scheduler, cfg),
                     resume_check.other_differences(common.get("config"), cfg)):
            if line and rank0:
                print(line, flush=True)
    load_optim = not weights_only and not (cfg is not None and cfg.no_load_optim)
    model_sd = parts.module.sharded_state_dict()
    request = {"model": model_sd}
    if load_optim:
        create_adam_state(parts.optimizer)  # where it was built elsewhere: state to load into
        saved = {"distrib_optim_sharding_type": (record["optimizer"] or {}).get("format") or "dp_reshardable"}
        request["optimizer"] = optimizer_state.sharded_state_dict(parts.optimizer, model_sd, saved, is_loading=True)
    load_rng = (not weights_only and common.get("layout") == parallel_layout()
                and not (cfg is not None and cfg.no_load_rng))
    if load_rng:
        request["rng"] = rng_object(common["layout"], state={})
    try:
        state = dist_checkpointing.load(request, folder)
    except BaseException as e:  # noqa: B036 - torch's CheckpointException is one; re-raised unless a tensor is missing
        key = _missing_key(e)
        if key is None:
            raise
        raise CheckpointError(f"load {folder!r}: it holds no {key}, which this run loads" + (
            " (its optimizer has no Adam state: saved before fp16's first taken step, by a spiral_megatron of "
            "2026-12-04 or earlier or over apex's or Transformer Engine's Adam; --no-load-optim resumes from its "
            "weights with a new optimizer)"
            if key.startswith("optimizer.state.exp_avg") else "")) from None
    parts.module.load_state_dict(state["model"])
    if load_optim:
        with torch.no_grad():  # fp32 training: the distributed optimizer's shards view the parameters
            torch_adam.load_optimizer(parts.optimizer, state["optimizer"])
        torch_adam.restore_adam_steps(parts.optimizer)
    else:  # bf16/fp16: the main (fp32) copies were made from the initial weights, the first step would put them back
        parts.optimizer.reload_model_params()  # its main copies from the loaded weights
    if weights_only:
        return Restored(iteration, None, True)
    scheduler_state.load(parts.scheduler, common["scheduler"])
    if load_rng:
        set_rng(state["rng"])
    return Restored(iteration, common["consumed_samples"], False, common.get("extra", {}))


def _missing_key(error: BaseException) -> Optional[str]:
    """The tensor key megatron-core's load found missing in the checkpoint (its KeyError "<key>
    from model not in state dict: [every key there]", raised directly or in torch's
    CheckpointException per rank); None for any other error."""
    wrapped = getattr(error, "failures", {}).values()  # torch.distributed.checkpoint: rank -> (error, stack)
    for e in (error, *(w[0] if isinstance(w, tuple) else w for w in wrapped)):
        if isinstance(e, KeyError) and e.args:
            key, found, _ = str(e.args[0]).partition(" from model not in state dict")
            if found:
                return key
    return None
