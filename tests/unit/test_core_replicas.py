"""The replicated core's cross-stage gradient sum covers one flat region of DDP's buffer
(issue 5): the core's contiguous range, or the owned shards of its three buckets."""

import pytest
import torch

from spiral_megatron.model.layer_specs import get_spiral_model_spec
from spiral_megatron.model.loop import SpiralLoop
from spiral_megatron.parallel.pipeline import grad_regions
from tests.tiny import tiny_config


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_core_gradients_are_one_region_of_the_grad_buffer(megatron, distributed_optimizer):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = tiny_config(num_core_layers=3)
    loop = SpiralLoop(config, get_spiral_model_spec(config).loop, iterations=range(4))
    core = list(loop.core.parameters())
    core[0].shared_embedding = core[-1].shared_embedding = True  # as CoreReplicas.mark
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        overlap_grad_reduce=True, use_distributed_optimizer=distributed_optimizer), loop)
    regions = grad_regions(ddp, loop.core)
    numel = sum(p.numel() for p in core)
    if distributed_optimizer:  # three buckets of core parameters only, this rank's shard of each
        assert len(regions) == 3 and sum(r.numel() for r in regions) >= numel
    else:
        assert len(regions) == 1 and regions[0].numel() == numel
    for r in regions:
        r.fill_(1.0)
    assert all(torch.all(p.main_grad == 1) for p in core)
    assert not any(torch.any(p.main_grad == 1) for n, p in loop.named_parameters() if not n.startswith("core."))
