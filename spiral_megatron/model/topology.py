"""How one iteration's token update u merges into the loop state (docs/MODEL.md section 3.5).

Each topology is a module with these steps, over a state tuple whose first tensor is h:
    state = init(h0, e)         h0: the prelude's output, e: the raw token embeddings [s, b, h]
    h     = read(state)         the input of the next iteration [s, b, h]
    state = write(state, u, t)  after iteration t produced u [s, b, h]
    packed = pack(state)        the state as one tensor [k * s, b, h], for a pipeline message
    state = unpack(packed)
The math and the dispatch (`init_state`, `update_state`) are `functional_spiral.py`, shared with
the Hugging Face model; the modules here hold the MeSH routers and the pipeline packing.
"""

from typing import Tuple

import torch
from megatron.core.transformer.module import MegatronModule

from spiral_megatron import functional_spiral as F
from spiral_megatron.model.replicated_linear import ReplicatedLinear

State = Tuple[torch.Tensor, ...]


class Residual(MegatronModule):
    """h <- h + u [ours]; with every g = 1 this is a classic looped transformer."""

    name = "residual"
    state_size = 1  # (h,): the packed state is state_size x the sequence
    uses_embeddings = False

    def __init__(self, config, iterations: range):
        super().__init__(config=config)

    def init(self, h0: torch.Tensor, embeddings: torch.Tensor = None) -> State:
        return F.init_state(self.name, h0)

    def read(self, state: State) -> torch.Tensor:
        return state[0]

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        return F.update_state(self.name, state, u)

    def modules_of_init(self) -> list:
        """The modules `init` calls (their parameters, in order of use)."""
        return []

    def modules_of(self, t: int) -> list:
        """The modules `write(state, u, t)` calls."""
        return []

    def pack(self, state: State) -> torch.Tensor:
        """A state of k tensors [s, b, h] -> one tensor [k * s, b, h] for a pipeline message."""
        return torch.cat(state, dim=0) if len(state) > 1 else state[0]

    def unpack(self, packed: torch.Tensor) -> State:
        return tuple(packed.chunk(self.state_size, dim=0)) if self.state_size > 1 else (packed,)


class Anchor(Residual):
    """h <- h0 + u: every iteration restarts from the loop's input (paper baseline)."""

    name = "anchor"
    state_size = 2  # (h, h0)


class Mesh(Residual):
    """A buffer of B slots with per-token write and read routers (MeSH, arXiv 2510.07739, 3.2).

    Slot 0 starts as the raw token embeddings e, the others as zeros. A transitional step with
    its own router pair writes the prelude output p and reads h(0); then iteration t, from the
    state h(t) that entered it:
        slot_b += u * softmax_b(W_t h(t))        u: the iteration's shifted token update
        h(t+1)  = sum_b slot_b * softmax_b(R_t h(t))
    T + 1 router pairs, Linear(d, B) without bias (MeSH table 5 counts 2 (T+1) d B weights).
    A pipeline stage builds the pairs of its iterations, and the transitional pair if it runs
    iteration 0. The state is (h [s, b, h], slots [s * b, B, h]: a row per token).
    """

    name = "mesh"
    uses_embeddings = True

    def __init__(self, config, iterations: range):
        super().__init__(config, iterations)
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
        return _routed(self.init_write_router, self.init_read_router,
                       lambda weights: F.init_state(self.name, h0, embeddings, weights, self.num_slots))  # (h(0), slots)

    def write(self, state: State, u: torch.Tensor, t: int) -> State:
        return _routed(self.write_router[str(t)], self.read_router[str(t)],
                       lambda weights: F.update_state(self.name, state, u, weights))

    def modules_of_init(self) -> list:
        return [self.init_write_router, self.init_read_router]

    def modules_of(self, t: int) -> list:
        return [self.write_router[str(t)], self.read_router[str(t)]]

    def pack(self, state: State) -> torch.Tensor:
        h, slots = state
        slots = slots.unflatten(0, h.shape[:2]).permute(2, 0, 1, 3)  # [B, s, b, h]
        return torch.cat([h.unsqueeze(0), slots], dim=0).flatten(0, 1)  # [(1 + B) * s, b, h]

    def unpack(self, packed: torch.Tensor) -> State:
        parts = packed.unflatten(0, (1 + self.num_slots, -1))  # [1 + B, s, b, h]
        return (parts[0], parts[1:].permute(1, 2, 0, 3).reshape(-1, self.num_slots, parts.shape[-1]))  # [s * b, B, h]


def _routed(write, read, fn):
    """fn((W, R)), the router pair's weights, run inside both routers' calls (ReplicatedLinear's
    `fused`), so that the hooks on them (Megatron DDP's all-gather wait) see the weights used."""
    return write(None, lambda _, w, __: read(None, lambda _, r, __: fn((w, r))))
