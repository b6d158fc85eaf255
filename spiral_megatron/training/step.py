"""One training step and one evaluation, through Megatron's forward-backward schedule.

Under pipeline parallelism every stage runs `forward_step` on the same micro-batches (each
reads what it needs: the first stage the tokens, the last the labels and loss mask), and
only the last stage computes losses; `_mean_loss` hands its value to every rank so that
logging and the NaN check see the same number everywhere.
"""

from functools import partial
from typing import Dict, Iterator

import torch

from spiral_megatron.training.build import Components


def forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """Megatron's forward_step_func: the per-token loss [b, s] (last stage; earlier stages
    return what they send on) and how to reduce it."""
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


def _mean_loss(values, num_microbatches: int) -> float:
    """The micro-batch losses averaged over micro-batches and data-parallel ranks, on every rank.

    Only the last pipeline stage has losses (`values` is empty elsewhere): it contributes the
    sum, the others zero, and a sum over the pipeline group gives every stage the value.
    """
    from megatron.core import parallel_state as ps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    local = torch.zeros((), dtype=torch.float32, device=device)
    if values:
        local = torch.stack([v["lm loss"] for v in values]).float().sum().to(device) / num_microbatches
    torch.distributed.all_reduce(local, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(local, group=ps.get_pipeline_model_parallel_group())
    return local.item() / ps.get_data_parallel_world_size()


def train_step(parts: Components, data_iterator: Iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int, global_batch_size: int) -> Dict[str, float]:
    """Forward and backward over `num_microbatches`, one optimizer and scheduler step.

    Megatron's optimizer step clips the global gradient norm (`clip_grad`), on CPU too: the
    CPU path reports CPU tensors with the type string Megatron's clipping asserts.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    parts.model.zero_grad_buffer()
    parts.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[parts.model],
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False,
    )
    success, grad_norm, _ = parts.optimizer.step()
    if success:
        parts.scheduler.step(increment=global_batch_size)
    return {
        "loss": _mean_loss(losses, num_microbatches),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "lr": parts.optimizer.param_groups[0]["lr"],
        "skipped": not success,
    }


@torch.no_grad()
def evaluate(parts: Components, data_iterator: Iterator, eval_iters: int, num_microbatches: int,
             seq_length: int, micro_batch_size: int) -> float:
    """Mean validation loss over `eval_iters` global batches (the same on every rank)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    parts.model.eval()
    total = 0.0
    for _ in range(eval_iters):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=[parts.model],
            num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True,
        )
        total += _mean_loss(losses, num_microbatches)
    parts.model.train()
    return total / eval_iters
