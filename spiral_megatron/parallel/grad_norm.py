"""The gradient norm as one fused reduction, kept on the device (issue 23).

Without apex and Transformer Engine (a pip install on GPUs), Megatron-Core's gradient norm
(`clip_grads.get_grad_norm_fp32`) falls back to `utils.local_multi_tensor_l2_norm`, which builds
`torch.tensor([norm of each gradient])` from device scalars: one host sync per gradient tensor
(hundreds per step at 410m), then one more for the total and one for its `.item()`.

`FusedNormChainedOptimizer` is Megatron's `ChainedOptimizer` (what `get_megatron_optimizer`
returns) with the norm and the clipping written for the device, as Megatron computes them when
Transformer Engine is installed:
    norm = sqrt(sum over the grad-stats group of |stack(foreach_norm(local grads))|^2)
    grads *= min(1, clip_grad / (norm + 1e-6))      (a no-op when not below 1, as in Megatron)
The gradients are the ones Megatron's norm takes (its own filter: no shared or tensor-parallel
duplicates), the sum runs over the group Megatron's does (the model-parallel group, or the
whole world with the distributed optimizer), and the clipped gradients are every main
gradient, as in Megatron. `step` returns the norm as a 0-d float32 device tensor; the job reads
it one step later with the loss (step.StepFlags). Options this path does not implement are
refused at construction, in one line.
"""

from typing import List

import torch
from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer


def squared_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """|concat(grads)|^2 in float32, as Megatron's fallback computes it (the norm of the
    per-tensor norms, squared), in one fused reduction and without a host read. -> 0-d"""
    norms = torch._foreach_norm(grads)  # per-tensor 2-norms, device scalars
    return torch.linalg.vector_norm(torch.stack(norms).float()).square()


class FusedNormChainedOptimizer(ChainedOptimizer):
    """Megatron's ChainedOptimizer whose gradient norm and clipping never read the device."""

    def __init__(self, chained_optimizers: List[MegatronOptimizer]):
        super().__init__(chained_optimizers)
        for optimizer in chained_optimizers:
            config = optimizer.config
            if config.use_precision_aware_optimizer:
                raise ValueError("use_precision_aware_optimizer True is not supported by the fused gradient norm")
            threshold = getattr(config, "grad_norm_skip_threshold", float("inf"))  # megatron-core >= 0.19
            if threshold != float("inf"):
                raise ValueError(f"grad_norm_skip_threshold {threshold} is not supported by the fused gradient norm")
            params = optimizer.get_parameters()
            if any(getattr(p, "grad_norm_group", None) is not None for p in params):
                raise ValueError("parameters in a separate grad_norm_group are not supported by the fused gradient norm")
            if any(getattr(p, "__fsdp_param__", False) for p in params):
                raise ValueError("Megatron-FSDP parameters are not supported by the fused gradient norm")

    @staticmethod
    def _grads_for_norm(optimizer: MegatronOptimizer) -> List[torch.Tensor]:
        """Megatron's choice of gradients for the norm (the method's name changed in 0.17)."""
        grads = getattr(optimizer, "get_grads_for_grad_norm", None) or optimizer.get_main_grads_for_grad_norm
        return grads()

    @torch.no_grad()
    def get_grad_norm(self) -> torch.Tensor:
        """The global 2-norm of the gradients, one all-reduce per distinct grad-stats group
        (Megatron's chained norm: the square root of the sum of each group's square). -> 0-d"""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if not self.chained_optimizers:
            return torch.zeros((), dtype=torch.float32, device=device)
        squares = {}  # grad-stats group -> this rank's sum of squares, in the chain's order on every rank
        for optimizer in self.chained_optimizers:
            group, grads = optimizer.get_grad_stats_parallel_group(), self._grads_for_norm(optimizer)
            square = squared_norm(grads) if grads else torch.zeros((), dtype=torch.float32, device=device)
            squares[group] = squares[group] + square if group in squares else square
        for group, square in squares.items():  # every rank joins every group's reduction, gradients or not
            torch.distributed.all_reduce(square, group=group)
        return torch.stack(list(squares.values())).sum().sqrt()

    @torch.no_grad()
    def clip_grads(self, grad_norm: torch.Tensor) -> None:
        """Scale every main gradient by clip_grad / (norm + 1e-6) where that is below 1 (Megatron's
        clip_grad_by_total_norm_fp32, each chained optimizer with its own clip_grad > 0)."""
        for optimizer in self.chained_optimizers:
            if getattr(optimizer, "is_stub_optimizer", False) or optimizer.config.clip_grad <= 0.0:
                continue
            grads = [p.grad for p in optimizer.get_parameters() if p.grad is not None]
            if grads:
                coeff = optimizer.config.clip_grad / (grad_norm + 1.0e-6)
                torch._foreach_mul_(grads, torch.where(coeff < 1.0, coeff, 1.0))

    @torch.no_grad()
    def step(self):
        """Megatron's ChainedOptimizer.step with the norm above: -> (success, norm (0-d), zeros)."""
        self.grad_norms_by_group = {}
        if self.prepare_grads():  # fp16: non-finite gradients, the step is skipped
            return False, None, None
        grad_norm = self.get_grad_norm()
        self.clip_grads(grad_norm)
        num_zeros = self.count_zeros() if self.config.log_num_zeros_in_grad else None
        return self.step_with_ready_grads(), grad_norm, num_zeros


def fused_norm(optimizer: MegatronOptimizer) -> FusedNormChainedOptimizer:
    """`get_megatron_optimizer`'s result with the fused norm: its optimizers, chained anew."""
    return FusedNormChainedOptimizer(list(getattr(optimizer, "chained_optimizers", [optimizer])))
