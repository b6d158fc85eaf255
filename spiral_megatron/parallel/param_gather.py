"""Megatron DDP's parameter all-gathers chained in the order the forward uses them.

With the distributed optimizer and `overlap_param_gather`, each DDP bucket group's parameters
are all-gathered before the forward first uses them: a module's forward pre-hook waits for its
group's gather (dispatching it then if it is not on its way) and dispatches the next group's,
so that one gather runs while the previous group's layers compute. Megatron links each group to
the next in the order the parameters were registered, which is GPTModel's forward order.
SpiralGPTModel's is not: the loop's small parameters (MeSH's transitional routers, a level's
down-scale) are registered after the core but used before it, so their group was gathered in
the forward's path, out of the chain, and Megatron warned that the next bucket's gather had
already been dispatched. `chain` relinks the groups in the order of first use (the model's
`parameters_in_forward_order`); buckets, their contents and every checkpoint stay as they are.
"""

from typing import Iterable


def chain(ddp, params_in_forward_order: Iterable) -> None:
    """Link `ddp`'s bucket groups (next_param_gather_bucket_group) in the order their
    parameters first appear in `params_in_forward_order`; groups it does not reach go last."""
    if not ddp.ddp_config.overlap_param_gather:
        return  # gathered all at once after the optimizer step: no chain
    order = []
    for param in params_in_forward_order:
        group = ddp.param_to_bucket_group.get(param)
        if group is not None and group not in order:
            order.append(group)
    order += [group for group in ddp.bucket_groups if group not in order]
    for group, following in zip(order, order[1:] + [None]):
        group.next_param_gather_bucket_group = following
