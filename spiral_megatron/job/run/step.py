"""One training step and one evaluation, through Megatron's forward-backward schedule.

Under pipeline parallelism every stage runs `forward_step` on the same micro-batches (each
reads what it needs: the first stage the tokens, the last the labels and loss mask), and
only the last stage computes losses.

No step waits for the device on our account (issue 15): the step's loss stays on the device,
and `StepFlags` reduces it together with the exit flag in one all-reduce, whose result the
host reads one step later, when the device has finished it (or at once, before a log line or
a save). The gradient norm stays on the device too (parallel/grad_norm.py, issue 23) and is read with
them.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional, Tuple

import torch

from spiral_megatron.job.build import Components
from spiral_megatron.job.run.housekeeping import release_unused_memory


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """Megatron's forward_step_func: the per-token loss [b, s] (last stage; earlier stages
    return what they send on) and how to reduce it."""
    batch = next(data_iterator)  # pinned on a GPU machine (data.micro_batches): the copy is asynchronous
    batch = {k: v.to(_device(), non_blocking=True) for k, v in batch.items()}
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s]
    return losses, partial(masked_mean_loss, batch["loss_mask"])


def masked_mean_loss(loss_mask: torch.Tensor, losses: torch.Tensor):
    """Mean loss over unmasked tokens of one micro-batch (the schedule divides by micro-batches)."""
    mask = loss_mask.reshape(-1).float()  # [b*s]
    loss = (losses.float().reshape(-1) * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place


def _local_loss(values, num_microbatches: int) -> torch.Tensor:
    """This rank's share of the step's mean loss, a 0-d device tensor: the micro-batch mean on
    the last pipeline stage's first tensor-parallel rank (the other TP ranks hold the same
    number), zero elsewhere; the sum over all ranks / dp is the global mean."""
    from megatron.core import parallel_state as ps

    if not values or ps.get_tensor_model_parallel_rank() != 0:
        return torch.zeros((), dtype=torch.float32, device=_device())
    return torch.stack([v["lm loss"] for v in values]).float().sum().to(_device()) / num_microbatches


@dataclass
class Settled:
    """A step's values on the host, the same on every rank."""

    iteration: int
    loss: float
    grad_norm: Optional[float]
    lr: float
    skipped: bool  # the optimizer skipped the step (fp16: the scaled gradients overflowed)
    exit_requested: bool  # some rank had received SIGTERM/SIGINT when the step was reduced
    loss_scale: Optional[float] = None  # fp16: the grad scaler's scale after the step
    num_zeros: Optional[float] = None  # with log_num_zeros_in_grad: zero gradient entries


class StepFlags:
    """One all-reduce per step, over all ranks, of [loss share, exit flag], left on the device:
    `swap` returns the previous step's values, `settle` the pending step's (a host sync).

    The reduced pair and the step's gradient norm (the same on every rank already) are copied
    to pinned host memory with an event recorded behind them; the host waits on that event one
    step later, after queuing the next step, so it never idles the device. A NaN on any rank
    makes the summed loss NaN: the non-finite check needs no flag.
    """

    def __init__(self, dp_size: int):
        self.dp_size = dp_size
        self.host = torch.zeros(3, dtype=torch.float32, pin_memory=torch.cuda.is_available())
        self.pending = None  # (iteration, host-side values, whether a norm was pushed, event)

    def push(self, iteration: int, loss: torch.Tensor, exit_requested: bool, host_values: dict) -> None:
        """host_values: the Settled fields known on the host, and "grad_norm": the optimizer's
        norm (a device tensor, a float, or None for a skipped step)."""
        values = dict(host_values)
        norm = values.pop("grad_norm", None)
        flag = torch.full((), float(exit_requested), dtype=torch.float32, device=loss.device)
        reduced = torch.stack([loss, flag])  # [2]
        torch.distributed.all_reduce(reduced)
        norm_t = torch.full((1,), math.nan) if norm is None else torch.as_tensor(norm, dtype=torch.float32)
        self.host.copy_(torch.cat([reduced, norm_t.to(reduced.device).reshape(1)]), non_blocking=True)
        event = None
        if reduced.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending = (iteration, values, norm is not None, event)

    def settle(self) -> Optional[Settled]:
        """The pending step's values, waiting for the device if needed; None when none is pending."""
        if self.pending is None:
            return None
        iteration, host_values, has_norm, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        loss, exits, norm = self.host.tolist()
        return Settled(iteration, loss / self.dp_size, grad_norm=norm if has_norm else None,
                       exit_requested=exits > 0, **host_values)

    def swap(self, iteration: int, loss: torch.Tensor, exit_requested: bool, host_values: dict
             ) -> Optional[Settled]:
        """Push this step and return the previous one, whose reduction the device finished
        while this step was being queued (call it after queuing the step's work)."""
        previous = self.settle()
        self.push(iteration, loss, exit_requested, host_values)
        return previous


def train_step(parts: Components, data_iterator: Iterator, num_microbatches: int, seq_length: int,
               micro_batch_size: int, global_batch_size: int, empty_unused_memory_level: int = 0
               ) -> Tuple[torch.Tensor, dict]:
    """Forward and backward over `num_microbatches`, one optimizer and scheduler step; returns
    this rank's loss share on the device (`_local_loss`) and the step's other values (the
    gradient norm on the device).

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
    release_unused_memory(empty_unused_memory_level, 1)
    success, grad_norm, num_zeros = parts.optimizer.step()
    if success:
        parts.scheduler.step(increment=global_batch_size)
    release_unused_memory(empty_unused_memory_level, 2)
    host = {
        "grad_norm": grad_norm,  # on the device (parallel/grad_norm.py), read with the loss a step later
        "lr": parts.optimizer.param_groups[0]["lr"],
        "skipped": not success,
    }
    if parts.optimizer.config.log_num_zeros_in_grad:  # counted on the host when asked (Megatron's count_zeros)
        host["num_zeros"] = num_zeros
    if parts.module.config.fp16:  # Megatron's step read its overflow flag already: no added wait
        host["loss_scale"] = parts.optimizer.get_loss_scale().item()
    return _local_loss(losses, num_microbatches), host


@torch.no_grad()
def evaluate(parts: Components, data_iterator: Iterator, eval_iters: int, num_microbatches: int,
             seq_length: int, micro_batch_size: int, empty_unused_memory_level: int = 0) -> float:
    """Mean validation loss over `eval_iters` global batches, the same on every rank: one
    all-reduce and one host read for the whole evaluation."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    parts.model.eval()
    total = torch.zeros((), dtype=torch.float32, device=_device())
    for _ in range(eval_iters):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=[parts.model],
            num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True,
        )
        total += _local_loss(losses, num_microbatches)
        release_unused_memory(empty_unused_memory_level, 1)
    torch.distributed.all_reduce(total)
    parts.model.train()
    return total.item() / (eval_iters * parallel_state.get_data_parallel_world_size())
