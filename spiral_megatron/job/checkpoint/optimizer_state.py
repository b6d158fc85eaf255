"""The optimizer's checkpoint state, in Megatron's formats, without three save bugs.

Without the distributed optimizer this is Megatron's `sharded_state_dict`, with Adam's step
count kept at 0 too (`with_step_zero`). The distributed optimizer's is built here:

The job builds the optimizer's sharded state dict here instead of with
`DistributedOptimizer.sharded_state_dict` (megatron-core 0.16.1 and 0.19.2): the same keys,
shapes and offsets for the two formats it saves, so Megatron's own `load_state_dict` reads
them, and where Megatron's save is right both write the same values. Two cases where it is not:

- `dp_reshardable` (Megatron-LM's default; each DP rank writes its shard of every DDP bucket):
  Megatron asserts "empty bucket encountered" when a rank's shard of a bucket holds no
  parameter. Every bucket is padded to a multiple of lcm(DP, 128) and split evenly over the DP
  ranks, so a bucket of one small parameter leaves the later ranks nothing but padding: the
  looped core's first and last parameters each get such a bucket when the core is replicated on
  several pipeline stages (pipeline.CoreReplicas.mark), which made the first save at PP2 x DP2
  fail on DP rank 1 of both stages. Such a rank writes the padding inside the bucket's unpadded
  length that falls in its shard; where none does, it holds a copy of the bucket's first
  element, which is never written: dist_checkpointing drops an empty list from the state's
  structure, which would shift every later bucket of that rank at load.
- `fully_reshardable` (gathered over DP into the parameters' shapes): Megatron's gather
  (`get_parameter_state_dp_zero`) concatenates each bucket's unpadded part, dropping the padding
  between buckets, but `sharded_param_state_fully_reshardable` slices every parameter at its
  padded offset in the buffer: with several buckets, each parameter after the first padded one
  was saved with another's values (docs/upstream/megatron-core-fully-reshardable-padding.md). Here each parameter is
  sliced at its own offset in the gathered tensors.
"""

from dataclasses import replace

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject, ShardedObject, ShardedTensor,
                                                      ShardedTensorFactory)
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories


def sharded_state_dict(optimizer, model_sharded_state_dict: dict, metadata: dict, is_loading: bool = False):
    """`optimizer.sharded_state_dict(...)`; the distributed optimizer's parameter state in the
    format `metadata["distrib_optim_sharding_type"]` ("dp_reshardable" or "fully_reshardable")
    is built below."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    if not any(isinstance(opt, DistributedOptimizer) for opt in chained):
        state = optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)
        return with_step_zero(optimizer, state)
    if len(chained) != 1:  # Megatron chains one per expert / layer-wise group; the job has neither
        raise ValueError(f"{len(chained)} chained optimizers: the job's checkpoints hold one distributed optimizer")
    opt, kind = chained[0], metadata["distrib_optim_sharding_type"]
    builders = {"dp_reshardable": _dp_reshardable, "fully_reshardable": _fully_reshardable}
    if kind not in builders:
        raise ValueError(f"distrib_optim_sharding_type {kind!r} must be one of {tuple(builders)}")
    state = opt.state_dict()  # param groups (+ grad scaler): as Megatron keys them per format
    if kind == "dp_reshardable":
        state = {k: _per_model_parallel_rank(opt, k, v) for k, v in state.items()}
    if is_loading:  # as Megatron: the torch optimizer's state exists before it is loaded into
        opt.load_state_dict(opt.state_dict())
    state["param_state"] = builders[kind](opt, model_sharded_state_dict, is_loading)
    state["param_state_sharding_type"] = kind
    return state


def with_step_zero(optimizer, state: dict) -> dict:
    """`state` (`optimizer.sharded_state_dict(...)`) with torch Adam's shared step count also
    where it is 0. megatron-core (0.16.1, 0.19.2) writes it as `common_step` only `if step:`, so
    a checkpoint saved before the first taken step (fp16's loss scale skips the first ones) had
    none, and its load handed torch state without one (KeyError 'step'). Only Megatron's plain
    optimizers keep per-parameter state there (the distributed one keeps its step in the param
    groups; apex's and TE's Adam keep none per parameter): for any other `state` a no-op."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(chained) != 1 or isinstance(chained[0], DistributedOptimizer):
        return state
    inner = state.get("optimizer", state)  # fp16/bf16: beside the main params; fp32: the torch state dict
    steps = [s["step"] for s in chained[0].optimizer.state.values() if "step" in s]
    if steps and "common_step" not in inner["state"]:  # Megatron left out a step of 0
        inner["state"]["common_step"] = steps[0].clone()
    return state


def _prefix(opt) -> str:
    return f"optimizer.distributed.dp_group_idx_{opt.data_parallel_group_idx}"


def _per_model_parallel_rank(opt, name: str, value) -> ShardedObject:
    """One object per TP x PP rank, written by DP rank 0 (Megatron's keys and replica ids)."""
    replica = (opt.distributed_optimizer_instance_id, 0, opt.data_parallel_group.rank())
    return ShardedObject(f"{_prefix(opt)}.{name}", value, (1,), (0,), replica_id=replica)


def _dp_reshardable(opt, model_sharded_state_dict: dict, is_loading: bool) -> dict:
    """Megatron's bucket-space state: per bucket, this rank's parameter shards and the padding
    between them as slices of one flat tensor per state key, of the bucket's unpadded length."""
    rank, ranks = opt.data_parallel_group.rank(), opt.data_parallel_group.size()
    state = opt.get_parameter_state_dp_reshardable()  # live tensors: written, or loaded into
    for name in ("per_bucket_numel", "per_bucket_numel_unpadded"):
        state[name] = _per_model_parallel_rank(opt, name, state[name])
    template = _tensor_template(opt, state)
    for gbuf_idx, buffer in enumerate(opt.buffers):
        for dtype, buckets in state[gbuf_idx].items():
            for bucket_idx, entries in enumerate(buckets):
                bucket = buffer.buckets[bucket_idx]
                shard = bucket.grad_data.numel() // ranks  # each rank's part of the padded bucket
                mine = min(shard, bucket.numel_unpadded - rank * shard)  # of it, inside the unpadded length
                key = f"{_prefix(opt)}.gbuf_idx_{gbuf_idx}.dtype_{dtype}.bucket_idx_{bucket_idx}"
                if mine > 0:
                    buckets[bucket_idx] = [_bucket_shard(opt, entry, key, bucket.numel_unpadded, rank * shard)
                                           for entry in _with_padding(entries, mine, template)]
                else:  # a copy of element 0 (DP rank 0 writes it), so that the list is not empty
                    copy = _padding(0, 1, template)
                    buckets[bucket_idx] = [_bucket_shard(opt, copy, key, bucket.numel_unpadded, 0, replica=rank)]
    return state


def _tensor_template(opt, state: dict) -> dict:
    """{state key: dtype} of this rank's parameter entries, for padding entries."""
    for gbuf_idx in range(len(opt.buffers)):
        for buckets in state[gbuf_idx].values():
            for entries in buckets:
                for entry in entries:
                    return {k: v.dtype for k, v in entry.items() if isinstance(v, torch.Tensor) and k != "step"}
    keys = ("param",) + tuple(getattr(opt, "optimizer_state_keys", ("exp_avg", "exp_avg_sq")))  # 0.16: Adam's
    return dict.fromkeys(keys, torch.float32)


def _padding(start: int, stop: int, template: dict) -> dict:
    """A padding entry over [start, stop) of this rank's shard of a bucket."""
    return {**{k: torch.empty(stop - start, dtype=dtype) for k, dtype in template.items()},
            "gbuf_local_start": start, "gbuf_local_end": stop, "padding": True}


def _with_padding(entries: list, end: int, template: dict) -> list:
    """This rank's parameter entries of one bucket (local offsets, ascending) with padding
    entries filling every gap in [0, end)."""
    out, cursor = [], 0
    for entry in entries:
        if entry["gbuf_local_start"] > cursor:
            out.append(_padding(cursor, entry["gbuf_local_start"], template))
        out.append({**entry, "padding": False})
        cursor = entry["gbuf_local_end"]
    if cursor < end:
        out.append(_padding(cursor, end, template))
    return out


def _bucket_shard(opt, entry: dict, key: str, numel_unpadded: int, shard_start: int, replica: int = 0) -> dict:
    """One entry's tensors as slices [start, stop) of this rank's shard of the bucket's flat
    tensors [numel_unpadded] (written unless `replica`); Adam's step and the padding flag stay
    in memory only."""
    start, stop = entry.pop("gbuf_local_start"), entry.pop("gbuf_local_end")
    out = {}
    for name, value in entry.items():
        if name in ("padding", "step"):  # the step count is saved with the param groups
            out[name] = LocalNonpersistentObject(value)
            continue
        assert value.shape == (stop - start,), (name, value.shape, start, stop)
        out[name] = ShardedTensor(
            key=f"{key}.{name}", data=value, dtype=value.dtype, local_shape=value.shape,
            global_shape=(numel_unpadded,), global_offset=(shard_start + start,), axis_fragmentations=None,
            replica_id=(opt.distributed_optimizer_instance_id, 0, replica), allow_shape_mismatch=False,
            flattened_range=None)
    return out


def _fully_reshardable(opt, model_sharded_state_dict: dict, is_loading: bool) -> dict:
    """{i: {state key: ShardedTensor}}, the i-th parameter of the buffers' `param_index_map`
    (the order Megatron's `load_parameter_state_from_fully_reshardable` reads), each shaped
    and keyed as the parameter's model entry ("optimizer.state.exp_avg.<model key>")."""
    gathered = None if is_loading else opt.get_parameter_state_dp_zero(use_gloo_comm=False, return_on_all_ranks=True)
    model_entries, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    entry_of = {entry.data: entry for entry in nested_values(model_entries)}
    keys = ("param",) + tuple(getattr(opt, "optimizer_state_keys", ("exp_avg", "exp_avg_sq")))  # 0.16: Adam's
    state, index = {}, 0
    for gbuf_idx, buffer in enumerate(opt.buffers):
        (dtype,) = opt.gbuf_ranges[gbuf_idx].keys()  # one dtype per buffer, as Megatron requires
        at = gathered_offsets(buffer)
        for param, (start, stop, bucket_id) in buffer.param_index_map.items():
            model = entry_of[param]
            begin = at[bucket_id] + start - buffer.buckets[bucket_id].offset
            tensors = {}
            for name in keys:
                if gathered is None:  # loading: a tensor of the right shape to load into
                    data = torch.empty(model.data.shape, dtype=torch.float32)
                else:
                    data = gathered[gbuf_idx][dtype][name][begin:begin + stop - start].view(model.data.shape)
                fields = dict(key=f"optimizer.state.{name}.{model.key}", data=data, dtype=data.dtype,
                              replica_id=model.replica_id)
                if isinstance(model, ShardedTensorFactory):
                    fields.pop("dtype")
                tensors[name] = replace(model, **fields)
                tensors[name].validate_metadata_integrity()
            state[index] = tensors
            index += 1
    return state


def gathered_offsets(buffer) -> list:
    """Where each bucket starts in `get_parameter_state_dp_zero`'s tensors, which hold each
    bucket's unpadded part, one after the other (no padding between buckets)."""
    starts = [0]
    for bucket in buffer.buckets[:-1]:
        starts.append(starts[-1] + bucket.numel_unpadded)
    return starts
