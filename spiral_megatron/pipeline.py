"""The shared core replicated on several pipeline stages (SPEC.md section 1 under PP).

Every stage that runs loop iterations holds a full replica of the core. The replicas start
identical because the first one is broadcast to the others when the model is built (each
stage draws its own random weights, after different modules), and stay so because their
gradients are summed over a dedicated process group after each step, as
Megatron does for word embeddings tied across the first and last stage
(`_allreduce_word_embedding_grads`). A checkpoint saves one copy: the replicas on later
stages are marked with a non-zero replica id, and any layout loads the same keys.
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
        """Tag the core's parameters with the flags Megatron reads for tied embeddings:
        `shared_embedding` (DDP gives each its own bucket under the distributed optimizer, so
        every stage shards it identically and the cross-stage sum lines up) and, on replicas
        after the first, `shared` (the gradient norm counts one copy)."""
        for p in core.parameters():
            p.spiral_core = True
            if self.replicated:
                p.shared_embedding = True
                p.shared = bool(self.index)

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

    def allreduce_grads(self, core: torch.nn.Module) -> None:
        """Sum the core's gradients (Megatron DDP's `main_grad`, else `.grad`) over replicas."""
        if not self.replicated:
            return
        for p in core.parameters():
            grad = getattr(p, "main_grad", None)
            grad = p.grad if grad is None else grad
            if grad is not None:
                dist.all_reduce(grad, group=self.group)


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
    from megatron.core.utils import get_attr_wrapped_model

    megatron_finalize(model, num_tokens, **kwargs)
    for chunk in model:
        spiral = get_attr_wrapped_model(chunk, "core_replicas", return_model_obj=True)
        if spiral.core_replicas is not None and spiral.loop is not None:
            spiral.core_replicas.allreduce_grads(spiral.loop.core)
