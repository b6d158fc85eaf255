"""Megatron-LM's spiky-loss and large-gradient checks (`--check-for-spiky-loss`,
`--check-for-large-grads`), so that a diverging run stops before it saves diverged weights.

Megatron's rule (RerunStateMachine.is_unexpectedly_large): a value is unexpectedly large when
it is at least 10x the largest value among the first 100 finite ones. [ours] During those first
100 it is also compared with the largest so far, so that a run diverging early is caught too
(a loss starts near ln(vocab) and falls: 10x the largest so far is divergence, not noise).
"""

import math
from typing import Iterable

import torch
import torch.distributed as dist

SPIKY_LOSS_FACTOR = 10.0  # Megatron-LM's training.py
REFERENCE_SAMPLES = 100  # Megatron's is_unexpectedly_large default


class LargeValueCheck:
    """`check(value)` is True when `value` is a spike against the reference maximum."""

    def __init__(self, factor: float = SPIKY_LOSS_FACTOR, samples: int = REFERENCE_SAMPLES):
        self.factor, self.samples = factor, samples
        self.count, self.max = 0, 0.0

    def check(self, value: float) -> bool:
        value = abs(value)
        if not math.isfinite(value):  # non-finite values are checked separately
            return False
        spike = self.count > 0 and value >= self.max * self.factor
        if not spike and self.count < self.samples:
            self.count, self.max = self.count + 1, max(self.max, value)
        return spike

    def describe(self) -> str:
        return f"{self.factor:g}x the largest of the first {self.count} steps ({self.max:.4g})"


def largest_abs_weight(parameters: Iterable[torch.Tensor], group=None) -> float:
    """max |w| over `parameters` on every rank of `group` (default: the world): NaN if any
    entry on any rank is NaN, else inf if any is infinite. One reduction on the device, one
    all-reduce and one host read, whatever the number of parameters.

    NaN needs care twice: Python's `max` over tensors keeps a NaN only when it comes first, and
    an all-reduce MAX (gloo's, NCCL's) may drop it too. So each rank sends [max |w| with NaN
    as inf, "has a NaN"], both reduced by MAX.
    """
    tensors = [p.detach() for p in parameters]
    device = tensors[0].device if tensors else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = torch.zeros((), device=device)
    if tensors:  # one inf-norm per parameter in a few fused kernels; max propagates NaN
        local = torch.stack([n.float() for n in torch._foreach_norm(tensors, math.inf)]).max()
    has_nan = local.isnan()
    flags = torch.stack([torch.where(has_nan, math.inf, local), has_nan.float()])  # [2]
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    largest, has_nan = flags.tolist()
    return math.nan if has_nan else largest
