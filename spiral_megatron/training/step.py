"""One training step and one evaluation, through Megatron's forward-backward schedule."""

from functools import partial
from typing import Dict, Iterator, Optional, Tuple

import torch

from spiral_megatron.training.build import Components


def forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """Megatron's forward_step_func: the per-token loss [b, s] and how to reduce it."""
    batch = next(data_iterator)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s]
    return losses, partial(masked_mean_loss, batch["loss_mask"])


def masked_mean_loss(loss_mask: torch.Tensor, losses: torch.Tensor):
    """Mean loss over unmasked tokens of one micro-batch (the schedule divides by micro-batches)."""
    mask = loss_mask.reshape(-1).float()  # [b*s]
    loss = (losses.float().reshape(-1) * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place


def _mean_over_data_parallel(values, num_microbatches: int) -> float:
    """The micro-batch losses of this rank averaged, then averaged over data-parallel ranks."""
    from megatron.core import parallel_state

    local = torch.stack([v["lm loss"] for v in values]).float().sum() / num_microbatches
    if torch.cuda.is_available():
        local = local.cuda()
    torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
    return local.item() / parallel_state.get_data_parallel_world_size()


@torch.no_grad()
def clip_and_step(optimizer, clip_grad: float) -> Tuple[bool, Optional[float]]:
    """Megatron's optimizer step with the gradient clipping done here (CPU path).

    The same sequence as `ChainedOptimizer.step` (prepare grads, global norm over the model-
    parallel group, scale, step), but the scaling is plain torch: Megatron's
    `clip_grad_by_total_norm_fp32` asserts CUDA tensors.
    """
    if optimizer.prepare_grads():
        return False, None
    grad_norm = optimizer.get_grad_norm()
    coeff = clip_grad / (grad_norm + 1.0e-6)
    if clip_grad > 0 and coeff < 1.0:
        for param in optimizer.get_parameters():
            if param.grad is not None:
                param.grad.mul_(coeff)
    return optimizer.step_with_ready_grads(), grad_norm


def train_step(parts: Components, data_iterator: Iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int, global_batch_size: int,
               clip_grad: float, on_cpu: bool) -> Dict[str, float]:
    """Forward and backward over `num_microbatches`, one optimizer and scheduler step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    parts.model.zero_grad_buffer()
    parts.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[parts.model],
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False,
    )
    if on_cpu:
        success, grad_norm = clip_and_step(parts.optimizer, clip_grad)
    else:
        success, grad_norm, _ = parts.optimizer.step()
    if success:
        parts.scheduler.step(increment=global_batch_size)
    return {
        "loss": _mean_over_data_parallel(losses, num_microbatches),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "lr": parts.optimizer.param_groups[0]["lr"],
        "skipped": not success,
    }


@torch.no_grad()
def evaluate(parts: Components, data_iterator: Iterator, eval_iters: int, num_microbatches: int,
             seq_length: int, micro_batch_size: int) -> float:
    """Mean validation loss over `eval_iters` global batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    parts.model.eval()
    total = 0.0
    for _ in range(eval_iters):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=[parts.model],
            num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True,
        )
        total += _mean_over_data_parallel(losses, num_microbatches)
    parts.model.train()
    return total / eval_iters
