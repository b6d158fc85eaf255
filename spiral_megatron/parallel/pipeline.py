"""The shared core replicated on several pipeline stages (docs/MODEL.md section 1 under PP).

Every stage that runs loop iterations holds a full replica of the core. The replicas start
identical because the first one is broadcast to the others when the model is built (and
spiral_megatron/model/init.py draws them from the same keys), and stay so because their gradients
are summed over a dedicated process group after each step, as Megatron does for word
embeddings tied across the first and last stage (`_allreduce_word_embedding_grads`). A
checkpoint saves one copy: the replicas on later stages are marked with a non-zero replica id,
and any layout loads the same keys.

The cross-stage sum is one collective per step over one flat region of Megatron DDP's gradient
buffer: the core's parameters are consecutive in the model, so their gradients are one
contiguous range of the buffer (all-reduced in place). Under the distributed optimizer only
this rank's shard of the reduced gradients is ever read, so only that is summed: the core is
laid out as DDP buckets identical on every stage (its first and last parameters, and under a
bucket size it would reach more of them, carry Megatron's `shared_embedding` flag, which closes
a bucket around them), and the owned shards of those buckets are summed in one flat buffer
(1/DP of the bytes).
"""

from typing import List

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import dict_list_map_inplace


class CoreReplicas:
    """Which stages of `plan` hold the core, this rank's replica index, the gradient group."""

    def __init__(self, plan, pp_group):
        self.stages = [s for s, stage in enumerate(plan) if stage.span("loop")]
        stage = pp_group.rank()
        self.index = self.stages.index(stage) if stage in self.stages else None  # 0 saves
        self.group = _replica_group(pp_group, self.stages) if len(self.stages) > 1 else None

    @property
    def replicated(self) -> bool:
        return self.group is not None

    def mark(self, core: torch.nn.Module) -> None:
        """Tag the core's parameters with the flags Megatron reads for tied embeddings: on
        replicas after the first, `shared` (the gradient norm counts one copy); on the first
        and last core parameters, `shared_embedding` (under the distributed optimizer DDP
        closes a bucket around such a parameter, so the core is three buckets laid out, padded
        and sharded identically on every stage and the owned shards of the sum line up)."""
        params = list(core.parameters())
        for p in params:
            p.spiral_core = True
            if self.replicated:
                p.shared = bool(self.index)
        if self.replicated:
            params[0].shared_embedding = True
            params[-1].shared_embedding = True

    def separate_buckets(self, core: torch.nn.Module, bucket_size: int) -> None:
        """Flag (`shared_embedding`) as many more core parameters as keep every run of unflagged
        ones below `bucket_size`. Megatron DDP closes a bucket on reaching the size on the first
        pipeline stage only, so a longer run would be split there and not on the other stages:
        the owned shards of the core's buckets would not line up and the cross-stage sum would
        mix parameters (gloo refuses the mismatched all-reduce; found at --ddp-bucket-size 4000
        on the debug flavor, as spiral-410m's 1e8-parameter core at Megatron's 4e7). DDP lays
        the buffer out from the last parameter to the first, each start padded to 64 elements
        (param_and_grad_buffer.py); a flagged parameter is a bucket of its own."""
        if not self.replicated:
            return
        run = 0  # elements of the open bucket of unflagged core parameters
        for p in reversed(list(core.parameters())):
            end = -(-run // 64) * 64 + p.numel()
            if getattr(p, "shared_embedding", False) or end >= bucket_size:
                p.shared_embedding, run = True, 0
            else:
                run = end

    def synchronize(self, core: torch.nn.Module) -> None:
        """Copy the first replica's weights to the others (collective over the replicas)."""
        if not self.replicated:
            return
        first = dist.get_global_rank(self.group, 0)
        for p in core.parameters():
            dist.broadcast(p.data, src=first, group=self.group)

    def mark_copies(self, sharded_state_dict: dict, prefix: str) -> None:
        """Give the core's entries on replicas after the first a non-zero pipeline replica id."""
        if not self.index:
            return

        def as_copy(x):
            if isinstance(x, (ShardedTensor, ShardedObject, ShardedTensorFactory)) and x.key.startswith(prefix):
                rid = x.replica_id if isinstance(x.replica_id, tuple) else (x.replica_id,)
                x.replica_id = (self.index,) + tuple(rid[1:])
            return x

        dict_list_map_inplace(as_copy, sharded_state_dict)

    def allreduce_grads(self, core: torch.nn.Module, ddp=None) -> None:
        """Sum the core's gradients over the replicas: one all-reduce over `grad_regions`
        (flattened into one buffer when there are several), else over each `.grad`."""
        if not self.replicated:
            return
        regions = grad_regions(ddp, core) if ddp is not None else None
        if regions is None:  # every core gradient in full (DDP's `main_grad`, else `.grad`)
            grads = [getattr(p, "main_grad", None) for p in core.parameters()]
            regions = [g if g is not None else p.grad for g, p in zip(grads, core.parameters())]
            regions = [g for g in regions if g is not None]
        if len(regions) == 1:
            dist.all_reduce(regions[0], group=self.group)
        elif regions:
            flat = torch.cat([region.reshape(-1) for region in regions])  # one message
            dist.all_reduce(flat, group=self.group)
            for region, summed in zip(regions, flat.split([region.numel() for region in regions])):
                region.copy_(summed.view_as(region))


def grad_regions(ddp, core: torch.nn.Module):
    """The views of DDP's gradient buffer that hold what the optimizer reads of the core's
    gradients, or None when the core is not in DDP's buffers.

    Without the distributed optimizer: the core's contiguous range of the buffer. With it:
    this rank's shard of each bucket of core parameters (buckets holding only core
    parameters, see CoreReplicas.mark)."""
    core_params = set(core.parameters())
    buffers = [b for b in getattr(ddp, "buffers", []) if core_params & set(b.param_index_map)]
    if len(buffers) != 1:
        return None
    buffer = buffers[0]
    if not core_params <= set(buffer.param_index_map):
        return None
    if not buffer.ddp_config.use_distributed_optimizer:
        spans = sorted(buffer.param_index_map[p][:2] for p in core_params)
        if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            return None  # not contiguous (cannot happen for consecutive parameters without padding)
        return [buffer.grad_data[spans[0][0]:spans[-1][1]]]
    dp, rank = buffer.data_parallel_world_size, buffer.data_parallel_group.rank()
    regions = []
    for bucket in buffer.buckets:
        if bucket.params & core_params:
            if not bucket.params <= core_params:
                raise RuntimeError("a DDP bucket mixes core and other parameters: the core's shards "
                                   "would not line up across pipeline stages")
            shard = bucket.grad_data.numel() // dp
            regions.append(bucket.grad_data[rank * shard:(rank + 1) * shard])
    return regions


def _replica_group(pp_group, stages: List[int]):
    """The group of this rank's pipeline peers at `stages` (same TP, DP, ... position).

    `new_group` is collective over the world and must be called for every group in the same
    order on every rank, so every rank learns every pipeline group first.
    """
    mine = dist.get_process_group_ranks(pp_group)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    mine_group = None
    for ranks in sorted({tuple(r) for r in everyone}):
        group = dist.new_group([ranks[s] for s in stages])
        if tuple(mine) == ranks:
            mine_group = group
    return mine_group


def finalize_model_grads(model, num_tokens=None, **kwargs):
    """Megatron's `finalize_model_grads`, then the core replicas' all-reduce across stages.

    Set it as `config.finalize_model_grads_func`; the pipeline schedules call it at the end
    of each step.
    """
    from megatron.core.distributed import finalize_model_grads as megatron_finalize

    megatron_finalize(model, num_tokens, **kwargs)
    allreduce_core_grads(model)


def allreduce_core_grads(model) -> None:
    """Sum the core replicas' gradients over pipeline stages, for each model chunk (a DDP
    wrapper or the SpiralGPTModel itself); nothing where the core is not replicated."""
    from megatron.core.utils import get_attr_wrapped_model

    for chunk in model:
        spiral = get_attr_wrapped_model(chunk, "core_replicas", return_model_obj=True)
        if spiral.core_replicas is not None and spiral.loop is not None:
            spiral.core_replicas.allreduce_grads(spiral.loop.core, ddp=chunk)
