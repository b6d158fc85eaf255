"""Down-scale, up-scale and the causal shift of one loop iteration (SPEC.md section 3).

Tensors are sequence-first, [s, b, h]; under sequence parallelism `s` is this rank's slice,
and every function here stays local to it except `shift_right`, which needs the last few
tokens of the previous rank (see there).

Down-scale: [s, b, h] -> [s/g, b, h], one latent per chunk of g consecutive tokens.
Up-scale:   latent update [s/g, b, h] -> token update [s, b, h].
"""

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from spiral_megatron.replicated_linear import ReplicatedLinear, softmax_fp32


def shift_right(x: torch.Tensor, k: int, sp_group=None) -> torch.Tensor:
    """out[i] = x[i - k] over the GLOBAL sequence, zeros for i < k.   x: [s, b, h]

    Under sequence parallelism (`sp_group` given) a rank's first k outputs are the previous
    rank's last k inputs. Every rank's last k tokens are all-gathered over the TP group (Megatron's
    `gather_from_sequence_parallel_region`, whose backward is the matching reduce-scatter),
    rather than a send/recv pair: k < g tokens per rank is tiny, and the gather keeps autograd
    and rank 0's zero fill trivial. Requires k <= s (checked by the schedule's layout rule).
    """
    if k == 0:
        return x
    if sp_group is None or sp_group.size() == 1:
        head = x.new_zeros((k,) + x.shape[1:])  # [k, b, h]
    else:
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


def _front_mask(g: int, num_pad: int, device) -> torch.Tensor:
    """[g] bool, True for the `num_pad` front-padding slots of the first chunk."""
    return torch.arange(g, device=device) < num_pad


class SelfAggregation(MegatronModule):
    """latent = sum_k softmax_k(A_t(h_k)) h_k over a chunk's tokens (paper default).

    A_t: Linear(h, 1) per iteration [ours]; no bias, since softmax ignores a constant.
    """

    def __init__(self, config, chunk_size: int):
        super().__init__(config=config)
        self.chunk_size = chunk_size
        self.scorer = ReplicatedLinear(config, config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, num_pad: int = 0) -> torch.Tensor:
        s, b, h = x.shape
        g = self.chunk_size
        chunks = x.view(s // g, g, b, h)  # [n, g, b, h]
        scores = self.scorer(chunks)  # [n, g, b, 1]
        if num_pad:  # front padding (chunk offset) takes no weight
            first = scores[:1].masked_fill(_front_mask(g, num_pad, x.device)[None, :, None, None], float("-inf"))
            scores = torch.cat([first, scores[1:]], dim=0)
        weights = softmax_fp32(scores, dim=1)  # [n, g, b, 1]
        return (weights * chunks).sum(dim=1)  # [n, b, h]


class MeanPool(MegatronModule):
    """latent = mean of the chunk's (real) tokens."""

    def __init__(self, config, chunk_size: int):
        super().__init__(config=config)
        self.chunk_size = chunk_size

    def forward(self, x: torch.Tensor, num_pad: int = 0) -> torch.Tensor:
        s, b, h = x.shape
        g = self.chunk_size
        chunks = x.view(s // g, g, b, h)  # [n, g, b, h]
        z = chunks.mean(dim=1)  # [n, b, h]
        if num_pad:  # the first chunk averages only its g - num_pad real tokens
            z = torch.cat([z[:1] * (g / (g - num_pad)), z[1:]], dim=0)  # padded slots are zero
        return z


class Allocate(MegatronModule):
    """Token slot k of chunk j receives sqrt(g) * beta_jk * delta_j, beta_j = softmax(B_t(y_j)).

    B_t: Linear(h, g) per iteration on the core's output latent y [ours: form, input and
    sqrt(g) scale, so that at uniform beta the chunk's total update energy sum_k |u_k|^2
    equals |delta|^2].
    """

    def __init__(self, config, chunk_size: int):
        super().__init__(config=config)
        self.chunk_size = chunk_size
        self.allocator = ReplicatedLinear(config, config.hidden_size, chunk_size, bias=True)

    def forward(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        n, b, h = delta.shape
        g = self.chunk_size
        beta = softmax_fp32(self.allocator(y), dim=-1)  # [n, b, g]
        slots = beta.permute(0, 2, 1).unsqueeze(-1) * delta.unsqueeze(1)  # [n, g, b, h]
        return (math.sqrt(g) * slots).reshape(n * g, b, h)  # [s, b, h]


class Repeat(MegatronModule):
    """Every token of chunk j receives delta_j unchanged."""

    def __init__(self, config, chunk_size: int):
        super().__init__(config=config)
        self.chunk_size = chunk_size

    def forward(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        n, b, h = delta.shape
        return delta.unsqueeze(1).expand(n, self.chunk_size, b, h).reshape(n * self.chunk_size, b, h)
