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
from spiral_megatron.parallel import param_gather
from spiral_megatron.parallel.pipeline import finalize_model_grads
from spiral_megatron.job.settings import training
from spiral_megatron.job.settings.resolve import Resolved


@dataclass
class Components:
    """What the loop trains: `model` is the DDP wrapper of `module` (the SpiralGPTModel)."""

    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: object
    scheduler: object
    model_args: ModelArgs


def before_ddp(ddp, module) -> None:
    """What this stage's `module` needs before Megatron DDP (the resolved
    DistributedDataParallelConfig `ddp`) wraps it: under the distributed optimizer, a core
    replicated on several stages gets bucket boundaries that every stage shares
    (pipeline.CoreReplicas.separate_buckets), whatever the bucket size."""
    from megatron.core import parallel_state

    if ddp is not None and ddp.use_distributed_optimizer and getattr(module, "loop", None) is not None \
            and module.core_replicas is not None:
        size = training.bucket_size(ddp, parallel_state.get_data_parallel_world_size())
        module.core_replicas.separate_buckets(module.loop.core, size)


def after_ddp(model, module) -> None:
    """What Megatron DDP `model` around this stage's `module` needs: its parameter all-gathers
    chained in the order the forward uses them (parallel/param_gather.py)."""
    param_gather.chain(model, module.parameters_in_forward_order())


def wrap_in_ddp(ddp, config, module):
    """Megatron DDP (the resolved DistributedDataParallelConfig `ddp`, copied) around this
    stage's `module`, with `before_ddp` and `after_ddp` (Bridge's provider runs them too)."""
    from megatron.core.distributed import DistributedDataParallel

    before_ddp(ddp, module)
    model = DistributedDataParallel(config, copy.copy(ddp), module)
    after_ddp(model, module)
    return model


def build(job: Resolved, prepare: Optional[Callable[[torch.nn.Module], None]] = None) -> Components:
    """This pipeline stage of the SpiralGPTModel in Megatron DDP, Megatron's Adam and
    OptimizerParamScheduler. Weights are drawn layout-independently from the seed. `prepare`
    gets the initialised module before DDP and the optimizer wrap it (the job restores a
    plugin's state there: job/checkpoint/extra_state.py)."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from spiral_megatron.parallel import grad_norm

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
    model = wrap_in_ddp(job.ddp, config, module)
    # Megatron's optimizers, chained with a gradient norm that never reads the device (parallel/grad_norm.py)
    optimizer = grad_norm.fused_norm(get_megatron_optimizer(copy.copy(job.optimizer), [model]))
    create_adam_state(optimizer)  # a checkpoint before fp16's first taken step has Adam's state
    scheduler = OptimizerParamScheduler(optimizer, **dataclasses.asdict(job.schedule))
    # The schedules find these hooks on the model config, as in Megatron-LM's training.py.
    # Ours wraps Megatron's and also sums the gradients of the core's replicas over stages.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    config.grad_scale_func = optimizer.scale_loss
    return Components(model, module, optimizer, scheduler, job.model_args)


def create_adam_state(optimizer) -> None:
    """Give every parameter of torch's Adam the state its first taken step would create (step 0,
    zero moments, on the devices and in the dtypes torch picks), so that training is unchanged.

    torch creates it lazily, and fp16's dynamic loss scale skips the first steps (Megatron's
    initial 2^32 overflows the debug flavor's first 14): a checkpoint saved before the first
    taken step had no Adam state. megatron-core (0.16.1, 0.19.2) then failed the save under the
    distributed optimizer (`DistributedOptimizer.state_dict` asserts one step count over the
    state) and the resume without it (its load template holds the moments: KeyError
    optimizer.state.exp_avg). apex's and Transformer Engine's fused Adam are left as Megatron
    builds them (not run here)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(opt, "optimizer", None)
        if not isinstance(adam, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if state:
                    continue
                if group["capturable"] or group["fused"]:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                else:
                    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                    state["step"] = torch.tensor(0.0, dtype=scalar, device="cpu")
                moments = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
                for name in moments:
                    state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)


def sync_params(model) -> None:
    """Finish the deferred parameter all-gather now (before a checkpoint is saved).

    With `overlap_param_gather` the optimizer step updates only this rank's shard and the
    all-gather of the updated weights runs in the next forward's pre-hooks, so between a step
    and the next forward the full weights are stale (Megatron-LM's `force_param_sync`)."""
    if model.ddp_config.overlap_param_gather:
        model.start_param_sync(force_sync=True)
