"""How the job trains, as Megatron's own configs: DDP, the optimizer, the LR schedule.

Made once per job by resolve.py from the keys; job/build.py hands them to Megatron unchanged.
"""

from dataclasses import dataclass

from spiral_megatron.job.settings.keys import TrainingConfig
from spiral_megatron.job.settings.model_config import DTYPES


@dataclass(frozen=True)
class Schedule:
    """Megatron's OptimizerParamScheduler arguments. Its steps count samples, as in Megatron-LM."""

    init_lr: float
    max_lr: float
    min_lr: float
    lr_warmup_steps: int
    lr_decay_steps: int
    lr_decay_style: str
    start_wd: float
    end_wd: float
    wd_incr_steps: int
    wd_incr_style: str
    use_checkpoint_opt_param_scheduler: bool
    override_opt_param_scheduler: bool


def warmup_iters(cfg: TrainingConfig) -> int:
    """Warmup steps: lr_warmup_fraction of the decay steps (Megatron-LM), else lr_warmup_iters."""
    if cfg.lr_warmup_fraction is not None:
        return int(round(cfg.lr_warmup_fraction * (cfg.lr_decay_iters or cfg.train_iters)))
    return cfg.lr_warmup_iters


def schedule(cfg: TrainingConfig) -> Schedule:
    """Linear warmup from 0 to lr, then decay to min_lr over lr_decay_iters (or train_iters);
    constant weight decay."""
    samples = cfg.global_batch_size
    return Schedule(
        init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=warmup_iters(cfg) * samples,
        lr_decay_steps=(cfg.lr_decay_iters or cfg.train_iters) * samples,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters * samples, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=cfg.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
    )


def ddp_config(cfg: TrainingConfig):
    """Megatron DDP as Megatron-LM runs it on GPUs: gradient reduction overlapped with the
    backward pass and, with the distributed optimizer, the parameter all-gather overlapped with
    the next forward (`--overlap-grad-reduce --overlap-param-gather`); gradients reduced in fp32."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True,
        overlap_param_gather=cfg.use_distributed_optimizer,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )


def optimizer_config(cfg: TrainingConfig):
    """Megatron's Adam with the job's learning rate, weight decay, clipping and precision."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", loss_scale=cfg.loss_scale,
        params_dtype=DTYPES[cfg.precision], use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
