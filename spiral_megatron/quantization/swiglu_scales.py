"""A SwiGLU linear_fc1's per-row weight scales, sharded as its weight is.

Megatron's SwiGLU fc1 weight is [gate; up]; under tensor parallelism rank r holds [gate_r; up_r],
and MLP.sharded_state_dict maps those two local halves to their places in the global tensor
(apply_swiglu_sharded_factory). A per-channel or per-block weight quantizer (int8 SmoothQuant,
int4 AWQ) has a scale row per weight row, so its amax needs the same mapping. modelopt 0.47's
Megatron MLP plugin means to apply it, but its key patterns ('weight_quantizer...') are matched
from the start of the full key and never match: the amax is sliced on dim 0 like any column-
parallel tensor, and at TP > 1 a rank quantizes its up rows with the gate's scales (the TP2 and
TP1 losses of one quantized checkpoint differed by 2e-4; weights alone, 1e-6).

`shard_like_weight(model)` routes those amax tensors through the same factory, as one global
tensor in [gate; up] order: the layout a TP1 save writes, so checkpoints saved before this fix
(by the tool at TP1, or by a TP > 1 run that loaded and saved them back unchanged) load right.
"""

import torch

SCALE_SUFFIXES = ("._amax", "._scale")


def shard_like_weight(model: torch.nn.Module) -> int:
    """Give every quantized SwiGLU MLP of `model` the swiglu sharding of its fc1 weight scales;
    returns how many MLPs."""
    from megatron.core.transformer.mlp import MLP

    mlps = [m for m in model.modules() if isinstance(m, MLP) and m.config.gated_linear_unit
            and hasattr(m.linear_fc1, "weight_quantizer")]
    for mlp in mlps:
        if not getattr(mlp, "_spiral_swiglu_scales", False):
            mlp.sharded_state_dict = _sharded_state_dict(mlp, mlp.sharded_state_dict)
            mlp._spiral_swiglu_scales = True
    return len(mlps)


def _sharded_state_dict(mlp, plain):
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    def sharded_state_dict(prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = plain(prefix, sharded_offsets, metadata)
        fc1 = f"{prefix}linear_fc1."
        for key, value in state.items():
            if not (key.startswith(fc1 + "weight_quantizer") and key.endswith(SCALE_SUFFIXES)
                    and isinstance(value, ShardedTensor)):
                continue
            quantizer = mlp.linear_fc1.get_submodule(key[len(fc1):].rsplit(".", 1)[0])
            if getattr(quantizer, "axis", None) is not None:  # a row per weight row (per-tensor: replicated)
                state[key] = apply_swiglu_sharded_factory(value, sharded_offsets, False)  # one key, [gate; up]
        return state

    return sharded_state_dict
