"""How one iteration's token update u merges into the loop state (SPEC.md section 3.5).

Each topology is a module with three steps, over a state that is a tuple of tensors of one
shape (so a pipeline stage can hand it on concatenated, see `pack`):
    state = init(h0)            h0: the loop input [s, b, h]
    h     = read(state)         the input of the next iteration [s, b, h]
    state = write(state, u, t)  after iteration t produced u [s, b, h]
    packed = pack(state)        the state as one tensor [k * s, b, h], for a pipeline message
    state = unpack(packed)
"""

from typing import Tuple

import torch
from megatron.core.transformer.module import MegatronModule

from spiral_megatron.replicated_linear import ReplicatedLinear, softmax_fp32

State = Tuple[torch.Tensor, ...]


def pack(state: State) -> torch.Tensor:
    """A state of k tensors [s, b, h] -> one tensor [k * s, b, h] for a pipeline message."""
    return torch.cat(state, dim=0) if len(state) > 1 else state[0]


def unpack(packed: torch.Tensor, k: int) -> State:
    """Inverse of `pack` for k tensors."""
    return tuple(packed.chunk(k, dim=0)) if k > 1 else (packed,)


class Residual(MegatronModule):
    """h <- h + u [ours, default]; with every g = 1 this is a classic looped transformer."""

    state_size = 1  # (h,)

    def __init__(self, config, iterations: range):
        super().__init__(config=config)

    def init(self, h0: torch.Tensor) -> State:
        return (h0,)

    def read(self, state: State) -> torch.Tensor:
        return state[0]

    def pack(self, state: State) -> torch.Tensor:
        return pack(state)

    def unpack(self, packed: torch.Tensor) -> State:
        return unpack(packed, 1)

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        return (state[0] + u,)


class Anchor(MegatronModule):
    """h <- h0 + u: every iteration restarts from the loop's input (paper baseline)."""

    state_size = 2  # (h, h0)

    def __init__(self, config, iterations: range):
        super().__init__(config=config)

    def init(self, h0: torch.Tensor) -> State:
        return (h0, h0)  # (h, h0)

    def read(self, state: State) -> torch.Tensor:
        return state[0]

    def pack(self, state: State) -> torch.Tensor:
        return pack(state)

    def unpack(self, packed: torch.Tensor) -> State:
        return unpack(packed, 2)

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        return (state[1] + u, state[1])


class Mesh(MegatronModule):
    """A buffer of B slots with learned per-token write and read routers (MeSH, arXiv 2510.07739).

    Slot 0 starts as the loop input, the others as zeros [ours: the loop input stands for
    "the embeddings" when there is a prelude]. Iteration t:
        slot_b += u * softmax_b(W_t(u))              write router on the update [ours]
        h       = sum_b slot_b * softmax_b(R_t(h))   read router on the previous state [ours]
    """

    def __init__(self, config, iterations: range):
        super().__init__(config=config)
        d, B = config.hidden_size, config.mesh_slots
        self.num_slots = B
        self.state_size = 1 + B  # (h, B slots)
        self.write_router = torch.nn.ModuleDict(
            {str(t): ReplicatedLinear(config, d, B, bias=True) for t in iterations}
        )
        self.read_router = torch.nn.ModuleDict(
            {str(t): ReplicatedLinear(config, d, B, bias=True) for t in iterations}
        )

    def init(self, h0: torch.Tensor) -> State:
        rest = h0.new_zeros((self.num_slots - 1,) + h0.shape)
        return (h0, torch.cat([h0.unsqueeze(0), rest], dim=0))  # (h, slots [B, s, b, h])

    def read(self, state: State) -> torch.Tensor:
        return state[0]

    def pack(self, state: State) -> torch.Tensor:
        h, slots = state
        return torch.cat([h.unsqueeze(0), slots], dim=0).flatten(0, 1)  # [(1 + B) * s, b, h]

    def unpack(self, packed: torch.Tensor) -> State:
        parts = packed.unflatten(0, (1 + self.num_slots, -1))  # [1 + B, s, b, h]
        return (parts[0], parts[1:])

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        h, slots = state
        w = softmax_fp32(self.write_router[str(t)](u), dim=-1)  # [s, b, B]
        slots = slots + w.permute(2, 0, 1).unsqueeze(-1) * u.unsqueeze(0)  # [B, s, b, h]
        r = softmax_fp32(self.read_router[str(t)](h), dim=-1)  # [s, b, B]
        h = torch.einsum("sbk,ksbd->sbd", r, slots)  # [s, b, h]
        return (h, slots)
