"""How one iteration's token update u merges into the loop state (SPEC.md section 3.5).

Each topology is a module with three steps, over a state that is a tuple of tensors
(so a pipeline stage can hand it on as is):
    state = init(h0)            h0: the loop input [s, b, h]
    h     = read(state)         the input of the next iteration [s, b, h]
    state = write(state, u, t)  after iteration t produced u [s, b, h]
"""

from typing import Tuple

import torch
from megatron.core.transformer.module import MegatronModule

from spiral_megatron.replicated_linear import ReplicatedLinear, softmax_fp32

State = Tuple[torch.Tensor, ...]


class Residual(MegatronModule):
    """h <- h + u [ours, default]; with every g = 1 this is a classic looped transformer."""

    def __init__(self, config, num_loops: int):
        super().__init__(config=config)

    def init(self, h0: torch.Tensor) -> State:
        return (h0,)

    def read(self, state: State) -> torch.Tensor:
        return state[0]

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        return (state[0] + u,)


class Anchor(MegatronModule):
    """h <- h0 + u: every iteration restarts from the loop's input (paper baseline)."""

    def __init__(self, config, num_loops: int):
        super().__init__(config=config)

    def init(self, h0: torch.Tensor) -> State:
        return (h0, h0)  # (h, h0)

    def read(self, state: State) -> torch.Tensor:
        return state[0]

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        return (state[1] + u, state[1])


class Mesh(MegatronModule):
    """A buffer of B slots with learned per-token write and read routers (MeSH, arXiv 2510.07739).

    Slot 0 starts as the loop input, the others as zeros [ours: the loop input stands for
    "the embeddings" when there is a prelude]. Iteration t:
        slot_b += u * softmax_b(W_t(u))              write router on the update [ours]
        h       = sum_b slot_b * softmax_b(R_t(h))   read router on the previous state [ours]
    """

    def __init__(self, config, num_loops: int):
        super().__init__(config=config)
        d, B = config.hidden_size, config.mesh_slots
        self.num_slots = B
        self.write_router = torch.nn.ModuleList(
            [ReplicatedLinear(config, d, B, bias=True) for _ in range(num_loops)]
        )
        self.read_router = torch.nn.ModuleList(
            [ReplicatedLinear(config, d, B, bias=True) for _ in range(num_loops)]
        )

    def init(self, h0: torch.Tensor) -> State:
        rest = h0.new_zeros((self.num_slots - 1,) + h0.shape)
        return (h0, torch.cat([h0.unsqueeze(0), rest], dim=0))  # (h, slots [B, s, b, h])

    def read(self, state: State) -> torch.Tensor:
        return state[0]

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        h, slots = state
        w = softmax_fp32(self.write_router[t](u), dim=-1)  # [s, b, B]
        slots = slots + w.permute(2, 0, 1).unsqueeze(-1) * u.unsqueeze(0)  # [B, s, b, h]
        r = softmax_fp32(self.read_router[t](h), dim=-1)  # [s, b, B]
        h = torch.einsum("sbk,ksbd->sbd", r, slots)  # [s, b, h]
        return (h, slots)
