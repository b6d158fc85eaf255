"""Model, Megatron DDP, optimizer and LR scheduler of a resolved job, all from megatron.core.

Reads only the Resolved object (job/settings/resolve.py): the SpiralConfig, the record, the
backend, the DDP, optimizer and schedule configs are decided there, once.
"""

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from spiral_megatron.model import init
from spiral_megatron.model.model_args import ModelArgs, make_model
from spiral_megatron.parallel.pipeline import finalize_model_grads
from spiral_megatron.job.settings.resolve import Resolved


@dataclass
class Components:
    """What the loop trains: `model` is the DDP wrapper of `module` (the SpiralGPTModel)."""

    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: object
    scheduler: object
    model_args: ModelArgs


def build(job: Resolved, prepare: Optional[Callable[[torch.nn.Module], None]] = None) -> Components:
    """This pipeline stage of the SpiralGPTModel in Megatron DDP, Megatron's Adam and
    OptimizerParamScheduler. Weights are drawn layout-independently from the seed. `prepare`
    gets the initialised module before DDP and the optimizer wrap it (the job restores a
    plugin's state there: job/checkpoint/extra_state.py)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if job.fusion_notes and torch.distributed.get_rank() == 0:
        print("\n".join(job.fusion_notes), flush=True)
    module = make_model(copy.copy(job.model), job.model_args, backend=job.backend,
                        pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage())
    if not job.on_cpu:
        module.cuda(torch.cuda.current_device())
    init.initialize(module, job.keys.seed)
    if prepare is not None:
        prepare(module)
    config = module.config
    model = DistributedDataParallel(config, copy.copy(job.ddp), module)
    optimizer = get_megatron_optimizer(copy.copy(job.optimizer), [model])
    scheduler = OptimizerParamScheduler(optimizer, **dataclasses.asdict(job.schedule))
    # The schedules find these hooks on the model config, as in Megatron-LM's training.py.
    # Ours wraps Megatron's and also sums the gradients of the core's replicas over stages.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    config.grad_scale_func = optimizer.scale_loss
    return Components(model, module, optimizer, scheduler, job.model_args)


def sync_params(model) -> None:
    """Finish the deferred parameter all-gather now (before a checkpoint is saved).

    With `overlap_param_gather` the optimizer step updates only this rank's shard and the
    all-gather of the updated weights runs in the next forward's pre-hooks, so between a step
    and the next forward the full weights are stale (Megatron-LM's `force_param_sync`)."""
    if model.ddp_config.overlap_param_gather:
        model.start_param_sync(force_sync=True)
