"""Down-scale, up-scale and the causal shift of one loop iteration (docs/MODEL.md section 3).

Tensors are sequence-first, [s, b, h]; under sequence parallelism `s` is this rank's slice,
and every function here stays local to it except `shift_right`, which needs the last few
tokens of the previous rank (see there).

Down-scale: chunks [s/g, g, b, h] -> [s/g, b, h], one latent per chunk of g consecutive tokens.
Up-scale:   latent update [s/g, b, h] -> token update [s, b, h].
The math is `spiral_megatron/functional_spiral.py`, shared with the Hugging Face model;
what stays here is the Megatron side: modules holding the weights, and the shift across
sequence-parallel ranks.
"""

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from spiral_megatron import functional_spiral as F
from spiral_megatron.model.replicated_linear import ReplicatedLinear


def shift_right(x: torch.Tensor, k: int, sp_group=None) -> torch.Tensor:
    """out[i] = x[i - k] over the GLOBAL sequence, zeros for i < k.   x: [s, b, h]

    Under sequence parallelism (`sp_group` given) a rank's first k outputs are the previous
    rank's last k inputs. Every rank's last k tokens are all-gathered over the TP group (Megatron's
    `gather_from_sequence_parallel_region`, whose backward is the matching reduce-scatter),
    rather than a send/recv pair: k < g tokens per rank is tiny, and the gather keeps autograd
    and rank 0's zero fill trivial. Requires k <= s (checked by the schedule's layout rule).
    """
    if sp_group is None or sp_group.size() == 1:
        return F.shift_right(x, k, dim=0)
    if k == 0:
        return x
    tails = tensor_parallel.gather_from_sequence_parallel_region(
        x[-k:].contiguous(), tensor_parallel_output_grad=True, group=sp_group
    )  # [tp*k, b, h]
    # Rank r takes rank r-1's tail; rank 0 takes the zeros in front. Every rank slices the
    # same concatenation, so the gather sits in every rank's graph and its backward
    # reduce-scatter runs everywhere (else ranks deadlock on unmatched collectives).
    tails = torch.cat([torch.zeros_like(tails[:k]), tails], dim=0)  # [(tp+1)*k, b, h]
    rank = sp_group.rank()
    head = tails[rank * k : (rank + 1) * k]
    return torch.cat([head, x[:-k]], dim=0)  # [s, b, h]


class SelfAggregation(MegatronModule):
    """latent = sum_k softmax_k(A_t(h_k)) h_k over a chunk's tokens (paper default).

    A_t: Linear(h, 1) per iteration [ours]; no bias, since softmax ignores a constant.
    """

    def __init__(self, config, chunk_size: int):
        super().__init__(config=config)
        self.chunk_size = chunk_size
        self.scorer = ReplicatedLinear(config, config.hidden_size, 1, bias=False)

    def forward(self, chunks: torch.Tensor, num_pad: int = 0) -> torch.Tensor:
        """chunks [n, g, b, h] (functional_spiral.chunk) -> latents [n, b, h]."""
        return self.scorer(chunks, lambda x, weight, _: F.aggregate(x, weight, num_pad, dim=0))  # [n, b, h]


class MeanPool(MegatronModule):
    """latent = mean of the chunk's (real) tokens."""

    def __init__(self, config, chunk_size: int):
        super().__init__(config=config)
        self.chunk_size = chunk_size

    def forward(self, chunks: torch.Tensor, num_pad: int = 0) -> torch.Tensor:
        """chunks [n, g, b, h] -> latents [n, b, h]."""
        return F.aggregate(chunks, None, num_pad, dim=0)


class Allocate(MegatronModule):
    """Token slot k of chunk j receives sqrt(g) * beta_jk * delta_j, beta_j = softmax(B_t(y_j)).

    B_t: Linear(h, g) per iteration on the core's output latent y [ours: form, input and
    sqrt(g) scale, see `functional_spiral.allocate`]. `shift`: the result shifted right, a view.
    """

    def __init__(self, config, chunk_size: int):
        super().__init__(config=config)
        self.chunk_size = chunk_size
        self.allocator = ReplicatedLinear(config, config.hidden_size, chunk_size, bias=True)

    def forward(self, y: torch.Tensor, delta: torch.Tensor, shift: int = 0) -> torch.Tensor:
        return self.allocator(y, lambda x, weight, bias: F.allocate(x, delta, weight, bias, dim=0, shift=shift))  # [s, b, h], shifted right


class Repeat(MegatronModule):
    """Every token of chunk j receives delta_j unchanged."""

    def __init__(self, config, chunk_size: int):
        super().__init__(config=config)
        self.chunk_size = chunk_size

    def forward(self, y: torch.Tensor, delta: torch.Tensor, shift: int = 0) -> torch.Tensor:
        return F.repeat(delta, self.chunk_size, dim=0, shift=shift)  # [s, b, h], shifted right
