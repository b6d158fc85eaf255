"""A module's parameters in the order its forward first uses them (parallel/param_gather.py).

Modules register their children in the order their forward calls them, with one exception in
Megatron's layers: `Attention` registers its output projection (`linear_proj`) before
`SelfAttention` adds the QKV projection and the q/k norms that run first. Megatron DDP chains
the parameter all-gathers of its bucket groups in registration order, so a bucket boundary
between the two made the gather of the QKV projection's group wait out of order.
"""

from typing import Iterator

import torch
from megatron.core.transformer.attention import Attention

RUN_FIRST = {Attention: ("linear_qkv", "q_layernorm", "k_layernorm")}  # children before the others


def parameters_in_forward_order(module: torch.nn.Module) -> Iterator[torch.nn.Parameter]:
    """module's parameters (each once), children in the order its forward calls them."""
    yield from module.parameters(recurse=False)
    children = dict(module.named_children())
    first = next((names for kind, names in RUN_FIRST.items() if isinstance(module, kind)), ())
    for name in [n for n in first if n in children] + [n for n in children if n not in first]:
        yield from parameters_in_forward_order(children[name])
