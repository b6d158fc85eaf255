"""The same seed gives the same initial model at every layout (docs/MODEL.md section 1).

Megatron draws weights in module-construction order from generators whose state depends on
the layout: a pipeline stage builds other modules before (or instead of) a given layer, the
GPU path draws per TP rank, and the small SpiralFormer linears use the default generator.
`initialize(model, seed)` redraws every randomly initialised parameter from a generator keyed
by (seed, the parameter's checkpoint key), which is the same at every TP/PP/DP layout and
pipeline split (StageBlock and the core replicas keep keys layout-independent), then keeps
this rank's slice of it, located exactly as the distributed checkpoint locates it
(`ShardedTensor.global_offset`). Each parameter keeps its own init rule: the config's
`output_layer_init_method` for output projections (`linear_proj`, `linear_fc2`, Megatron's
convention, so scaled output-projection stds are respected), `embedding_init_method` for the
embeddings and `init_method` for every other matrix; vectors (biases, norm weights) and
matrices built constant stay as built.

Cost: each rank draws the full tensor of each of its parameters once (per layer for the
core's stacked layers), on the parameter's device.
"""

import hashlib
from typing import Dict

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one tensor, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _draw(method, seed: int, key: str, shape, device, dtype) -> torch.Tensor:
    """The full tensor of `key`, drawn by `method` from a generator seeded by (seed, key)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(key_seed(seed, key))
        full = torch.empty(shape, device=device, dtype=torch.float32)
        method(full)
    return full.to(dtype)


def _local_slice(full: torch.Tensor, st: ShardedTensor) -> torch.Tensor:
    """This rank's shard of `full` (the tensor without `st`'s prepended layer axes)."""
    offsets = st.global_offset[st.prepend_axis_num:]
    index = tuple(slice(o, o + n) for o, n in zip(offsets, st.local_shape))
    return full[index]


def _sharded_params(model: torch.nn.Module) -> Dict[int, object]:
    """id(parameter) -> its ShardedTensor (or factory) in the model's sharded state dict."""
    out = {}
    for item in nested_values(model.sharded_state_dict()):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and isinstance(item.data, torch.nn.Parameter):
            out.setdefault(id(item.data), item)
    return out


def _is_random(p: torch.Tensor) -> bool:
    """Megatron draws matrices only (biases and norm weights are built constant); a matrix built
    constant (e.g. a zero-initialised one, or a tied output weight before its copy) stays so."""
    flat = p.detach().reshape(-1)
    return p.dim() >= 2 and flat.numel() > 1 and not bool((flat == flat[0]).all())


def _method(config, key: str):
    """The init rule Megatron applies to the parameter saved under `key`."""
    if key.endswith(OUTPUT_PROJECTIONS):
        return config.output_layer_init_method
    if key.startswith("embedding.") and getattr(config, "embedding_init_method", None) is not None:
        return config.embedding_init_method
    return config.init_method


def _pieces(item):
    """The ShardedTensors of one parameter: itself, or what its factory splits it into (a gated
    fc1 is [W_r; V_r], each half sharded over TP on its own); their `data` are views of it."""
    if isinstance(item, ShardedTensorFactory):
        built = item.build()
        return list(built.values()) if isinstance(built, dict) else list(built)
    return [item]


@torch.no_grad()
def initialize(model: torch.nn.Module, seed: int) -> int:
    """Redraw every random parameter of `model` (this rank's part) layout-independently.

    Returns the number of parameters redrawn. Raises for a parameter it cannot place.
    """
    config = model.config
    sharded = _sharded_params(model)
    redrawn = 0
    for name, p in model.named_parameters():
        if not _is_random(p):
            continue
        item = sharded.get(id(p))
        if item is None:
            raise RuntimeError(f"parameter {name} has no checkpoint key: cannot draw it layout-independently")
        method = _method(config, item.key)
        for st in _pieces(item):
            layers = st.global_offset[: st.prepend_axis_num]  # the core's stacked layer index
            key = st.key + "".join(f"@{i}" for i in layers)
            full = _draw(method, seed, key, st.global_shape[st.prepend_axis_num:], p.device, p.dtype)
            st.data.copy_(_local_slice(full, st).reshape(st.data.shape))
        redrawn += 1
    return redrawn
