"""How much activation memory a forward keeps for its backward (what recomputation saves).

Exact on any device: the unique storages of the tensors autograd saves, parameters excluded,
counted through `torch.autograd.graph.saved_tensors_hooks`. On CPUs this stands in for the
peak-memory counters that only CUDA has.
"""

from contextlib import contextmanager
from typing import Dict, Iterator

import torch


@contextmanager
def saved_for_backward(model: torch.nn.Module) -> Iterator[Dict[int, int]]:
    """Within the block, {storage address: bytes} of every activation saved for backward."""
    params = {p.data_ptr() for p in model.parameters()}
    kept: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept
