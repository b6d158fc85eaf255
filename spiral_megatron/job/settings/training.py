"""How the job trains, as Megatron's own configs: DDP, the optimizer, the LR schedule.

Made once per job by resolve.py from the keys; job/build.py hands them to Megatron unchanged.
"""

from dataclasses import dataclass
from typing import Optional

from spiral_megatron.job.settings.keys import TrainingConfig
from spiral_megatron.job.settings.model_config import DTYPES


@dataclass(frozen=True)
class Schedule:
    """Megatron's OptimizerParamScheduler arguments. Its steps count samples, as in Megatron-LM."""

    init_lr: float
    max_lr: float
    min_lr: float
    lr_warmup_steps: float
    lr_decay_steps: int
    lr_decay_style: str
    start_wd: float
    end_wd: float
    wd_incr_steps: int
    wd_incr_style: str
    use_checkpoint_opt_param_scheduler: bool
    override_opt_param_scheduler: bool
    wsd_decay_steps: Optional[int]
    lr_wsd_decay_style: str


def schedule(cfg: TrainingConfig) -> Schedule:
    """Linear warmup from lr_warmup_init to lr, then decay to min_lr; constant weight decay. Lengths in
    samples, as Megatron-LM counts them: with train_samples, the sample keys (decay over
    lr_decay_samples, else train_samples); else the iteration keys times the global batch (decay
    over lr_decay_iters, else train_iters). lr_warmup_fraction is a fraction of the decay: of
    its samples as Megatron-LM's, or with iterations rounded to whole steps [ours]. WSD anneals
    over the decay's last lr_wsd_decay_iters (or _samples)."""
    if cfg.train_samples is not None:
        total, decay = cfg.train_samples, cfg.lr_decay_samples or cfg.train_samples
        warmup = cfg.lr_warmup_samples if cfg.lr_warmup_fraction is None else cfg.lr_warmup_fraction * decay
        wsd = cfg.lr_wsd_decay_samples
    else:
        batch, decay_iters = cfg.global_batch_size, cfg.lr_decay_iters or cfg.train_iters
        total, decay = cfg.train_iters * batch, decay_iters * batch
        warmup = batch * (cfg.lr_warmup_iters if cfg.lr_warmup_fraction is None
                          else int(round(cfg.lr_warmup_fraction * decay_iters)))
        wsd = None if cfg.lr_wsd_decay_iters is None else cfg.lr_wsd_decay_iters * batch
    return Schedule(
        init_lr=cfg.lr_warmup_init, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=total, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=cfg.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
        wsd_decay_steps=wsd if cfg.lr_decay_style == "WSD" else None, lr_wsd_decay_style=cfg.lr_wsd_decay_style,
    )


def ddp_config(cfg: TrainingConfig):
    """Megatron DDP as Megatron-LM runs it on GPUs: gradient reduction overlapped with the
    backward pass and, with the distributed optimizer, the parameter all-gather overlapped with
    the next forward (`--overlap-grad-reduce --overlap-param-gather`); gradients reduced in fp32;
    buckets of `ddp_bucket_size` elements (None: Megatron's default, see bucket_size)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, bucket_size=cfg.ddp_bucket_size,
        overlap_param_gather=cfg.use_distributed_optimizer,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )


def bucket_size(ddp, dp: int) -> int:
    """Elements per DDP bucket of the resolved DistributedDataParallelConfig `ddp` at DP size `dp`:
    its own, else the default Megatron DDP resolves with the reduce overlapped
    (distributed_data_parallel.py: max(4e7, 1e6 x DP), so that each rank's part stays large)."""
    return ddp.bucket_size if ddp.bucket_size is not None else max(40_000_000, 1_000_000 * dp)


def optimizer_config(cfg: TrainingConfig):
    """Megatron's Adam with the job's learning rate, weight decay, clipping and precision (fp16:
    Megatron's grad scaler, static with `loss_scale`, else dynamic from the four loss-scale keys)."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", loss_scale=cfg.loss_scale,
        initial_loss_scale=cfg.initial_loss_scale, min_loss_scale=cfg.min_loss_scale,
        loss_scale_window=cfg.loss_scale_window, hysteresis=cfg.hysteresis,
        params_dtype=DTYPES[cfg.precision], use_distributed_optimizer=cfg.use_distributed_optimizer,
        log_num_zeros_in_grad=cfg.log_num_zeros_in_grad,
    )
