"""A small Linear replicated on every tensor-parallel rank (scorer, allocator, routers).

Its input is the token or latent states, which are replicated across TP ranks, or under
sequence parallelism only this rank's slice of the sequence. In the second case each rank
sees different tokens, so the parameters are marked `sequence_parallel = True`: Megatron's
`finalize_model_grads` then sums their gradients over the TP group, as it does for norms.
"""

from typing import Callable, Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class ReplicatedLinear(MegatronModule):
    """y = x W^T + b, W: [out, in]; weights initialised with `config.init_method`."""

    def __init__(self, config: TransformerConfig, in_features: int, out_features: int, bias: bool):
        super().__init__(config=config)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(device=device, dtype=config.params_dtype)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        if config.perform_initialization:
            config.init_method(self.weight)
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, x, fused: Optional[Callable] = None):
        """x W^T + b; with `fused`, fused(x, W, b) instead: a loop step that takes the weights
        itself (functional_autograd.py), run inside this module's call so that the hooks on it
        see the weights used (Megatron DDP waits there for their all-gather under
        overlap_param_gather; reading `.weight` outside a call would skip that wait)."""
        if fused is not None:
            return fused(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)

