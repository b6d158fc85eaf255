"""How one iteration's token update u merges into the loop state (docs/MODEL.md section 3.5).

Each topology is a module with these steps, over a state that is a tuple of tensors of one
shape (so a pipeline stage can hand it on concatenated, see `pack`):
    state = init(h0, e)         h0: the prelude's output, e: the raw token embeddings [s, b, h]
    h     = read(state)         the input of the next iteration [s, b, h]
    state = write(state, u, t)  after iteration t produced u [s, b, h]
    packed = pack(state)        the state as one tensor [k * s, b, h], for a pipeline message
    state = unpack(packed)
The math is `spiral_megatron/hf/functional_spiral.py`, shared with the Hugging Face model.
"""

from typing import Tuple

import torch
from megatron.core.transformer.module import MegatronModule

from spiral_megatron.hf import functional_spiral as F
from spiral_megatron.replicated_linear import ReplicatedLinear

State = Tuple[torch.Tensor, ...]


def pack(state: State) -> torch.Tensor:
    """A state of k tensors [s, b, h] -> one tensor [k * s, b, h] for a pipeline message."""
    return torch.cat(state, dim=0) if len(state) > 1 else state[0]


def unpack(packed: torch.Tensor, k: int) -> State:
    """Inverse of `pack` for k tensors."""
    return tuple(packed.chunk(k, dim=0)) if k > 1 else (packed,)


class Residual(MegatronModule):
    """h <- h + u [ours]; with every g = 1 this is a classic looped transformer."""

    state_size = 1  # (h,)
    uses_embeddings = False

    def __init__(self, config, iterations: range):
        super().__init__(config=config)

    def init(self, h0: torch.Tensor, embeddings: torch.Tensor = None) -> State:
        return (h0,)

    def read(self, state: State) -> torch.Tensor:
        return state[0]

    def pack(self, state: State) -> torch.Tensor:
        return pack(state)

    def unpack(self, packed: torch.Tensor) -> State:
        return unpack(packed, 1)

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        return (F.residual_write(state[0], u),)


class Anchor(MegatronModule):
    """h <- h0 + u: every iteration restarts from the loop's input (paper baseline)."""

    state_size = 2  # (h, h0)
    uses_embeddings = False

    def __init__(self, config, iterations: range):
        super().__init__(config=config)

    def init(self, h0: torch.Tensor, embeddings: torch.Tensor = None) -> State:
        return (h0, h0)  # (h, h0)

    def read(self, state: State) -> torch.Tensor:
        return state[0]

    def pack(self, state: State) -> torch.Tensor:
        return pack(state)

    def unpack(self, packed: torch.Tensor) -> State:
        return unpack(packed, 2)

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        return (F.anchor_write(state[1], u), state[1])


class Mesh(MegatronModule):
    """A buffer of B slots with per-token write and read routers (MeSH, arXiv 2510.07739, 3.2).

    Slot 0 starts as the raw token embeddings e, the others as zeros. A transitional step with
    its own router pair writes the prelude output p and reads h(0); then iteration t, from the
    state h(t) that entered it:
        slot_b += u * softmax_b(W_t h(t))        u: the iteration's shifted token update
        h(t+1)  = sum_b slot_b * softmax_b(R_t h(t))
    T + 1 router pairs, Linear(d, B) without bias (MeSH table 5 counts 2 (T+1) d B weights).
    A pipeline stage builds the pairs of its iterations, and the transitional pair if it runs
    iteration 0.
    """

    uses_embeddings = True

    def __init__(self, config, iterations: range):
        super().__init__(config=config)
        d, B = config.hidden_size, config.mesh_slots
        self.num_slots = B
        self.state_size = 1 + B  # (h, B slots)
        router = lambda: ReplicatedLinear(config, d, B, bias=False)  # noqa: E731
        self.write_router = torch.nn.ModuleDict({str(t): router() for t in iterations})
        self.read_router = torch.nn.ModuleDict({str(t): router() for t in iterations})
        if 0 in iterations:
            self.init_write_router, self.init_read_router = router(), router()

    def init(self, h0: torch.Tensor, embeddings: torch.Tensor = None) -> State:
        """h0: the prelude output p [s, b, h]; embeddings: e [s, b, h]."""
        slots = F.mesh_slots(embeddings, self.num_slots)  # [B, s, b, h]
        slots = F.mesh_write(slots, h0, self.init_write_router(h0))
        return (F.mesh_read(slots, self.init_read_router(h0)), slots)  # (h(0), slots)

    def read(self, state: State) -> torch.Tensor:
        return state[0]

    def pack(self, state: State) -> torch.Tensor:
        h, slots = state
        return torch.cat([h.unsqueeze(0), slots], dim=0).flatten(0, 1)  # [(1 + B) * s, b, h]

    def unpack(self, packed: torch.Tensor) -> State:
        parts = packed.unflatten(0, (1 + self.num_slots, -1))  # [1 + B, s, b, h]
        return (parts[0], parts[1:])

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        h, slots = state  # both routers read h(t), the state that entered iteration t
        slots = F.mesh_write(slots, u, self.write_router[str(t)](h))  # [B, s, b, h]
        return (F.mesh_read(slots, self.read_router[str(t)](h)), slots)
