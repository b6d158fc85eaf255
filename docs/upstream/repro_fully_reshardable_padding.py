"""megatron-core: `fully_reshardable` distributed-optimizer state is misplaced when a gradient
buffer holds several buckets (docs/upstream/megatron-core-fully-reshardable-padding.md).

Only torch and megatron-core; on GPUs:
    torchrun --nproc-per-node 1 docs/upstream/repro_fully_reshardable_padding.py
    torchrun --nproc-per-node 2 docs/upstream/repro_fully_reshardable_padding.py
Without CUDA it runs on gloo through spiral_megatron's CPU shim (how it was run here).

Four Linear(36, 36) layers (1332 parameters each), one Adam step with the distributed optimizer
and DDP buckets of 1000 elements (Megatron-LM's --ddp-bucket-size 1000): one bucket per layer,
1360 elements padded to 1408 (a multiple of 128). The optimizer's own sharded_state_dict in the `fully_reshardable` format is compared,
element by element, with the truth: `param` with the model's weight (fp32 training: the main
parameter after the step's all-gather) and `exp_avg` with (1 - beta1) x the reduced gradient
(Adam's first step). Exit code 1 when any tensor differs.
"""

import copy
import os

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

WIDTH, LAYERS, BUCKET, BETA1 = 36, 4, 1000, 0.9


class Net(MegatronModule):
    """LAYERS Linear(WIDTH, WIDTH) layers; every DP rank holds a replica of each weight."""

    def __init__(self, config):
        super().__init__(config)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))

    def forward(self, x):  # x: [batch, WIDTH]
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        replica = (0, 0, parallel_state.get_data_parallel_rank())
        return {f"{prefix}{name}": ShardedTensor.from_rank_offsets(f"{prefix}{name}", p, replica_id=replica)
                for name, p in self.named_parameters()}


def main() -> int:
    on_gpu = torch.cuda.is_available()
    if not on_gpu:  # only to run it without CUDA (not part of the reproduction)
        from spiral_megatron.parallel import cuda_on_cpu
        cuda_on_cpu.enable()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
    parallel_state.initialize_model_parallel(1, 1)
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(0)
    config = TransformerConfig(num_layers=1, hidden_size=WIDTH, num_attention_heads=1, use_cpu_initialization=True)
    module = Net(config).to(device)
    reference = copy.deepcopy(module)  # plain PyTorch: the gradient Adam's first moment must hold
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                        bucket_size=BUCKET, grad_reduce_in_fp32=True)
    model = DistributedDataParallel(config, ddp, module)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, adam_beta1=BETA1, weight_decay=0.0, clip_grad=0.0,
                        use_distributed_optimizer=True), [model])
    (buffer,) = model.buffers
    if parallel_state.get_data_parallel_rank() == 0:
        print(f"megatron-core {__import__('megatron.core').core.__version__}, torch {torch.__version__}, "
              f"DP {parallel_state.get_data_parallel_world_size()}, {len(buffer.buckets)} buckets: "
              + ", ".join(f"[{b.offset}, {b.offset + b.grad_data.numel()}) unpadded {b.numel_unpadded}"
                          for b in buffer.buckets))

    model.zero_grad_buffer()
    optimizer.zero_grad()
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    xs = [torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(r)).to(device) for r in range(dp)]
    model(xs[rank]).square().mean().backward()
    model.finish_grad_sync()
    optimizer.step()
    sum(reference(x).square().mean() for x in xs).div(dp).backward()  # DDP averages over DP
    grads = dict(zip(module.parameters(), (p.grad for p in reference.parameters())))

    state = optimizer.sharded_state_dict(model.sharded_state_dict(),
                                         metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    saved = {entry["param"].key.split(".layers.")[-1]: entry for entry in state["param_state"].values()}
    names = {p: n.removeprefix("layers.") for n, p in module.named_parameters()}
    # The proposed fix: slice the gathered tensors (each bucket's unpadded part, one after the
    # other) at the parameter's offset in its bucket plus the unpadded sizes of the buckets before.
    distributed = getattr(optimizer, "chained_optimizers", [optimizer])[0]  # 0.19 wraps it in a ChainedOptimizer
    (gathered,) = distributed.get_parameter_state_dp_zero(use_gloo_comm=False, return_on_all_ranks=True)[0].values()
    bucket_starts = [sum(b.numel_unpadded for b in buffer.buckets[:i]) for i in range(len(buffer.buckets))]
    differ = fixed_differ = 0
    for param, (start, stop, bucket) in buffer.param_index_map.items():
        entry, name = saved[names[param]], names[param]
        begin = bucket_starts[bucket] + start - buffer.buckets[bucket].offset
        truths = {"param": param.detach(), "exp_avg": (1 - BETA1) * grads[param]}
        for key, truth in truths.items():
            error = (entry[key].data.to(device) - truth).abs().max().item()
            fixed = (gathered[key][begin:begin + stop - start].to(device).view_as(truth) - truth).abs().max().item()
            differ, fixed_differ = differ + (error > 1e-6), fixed_differ + (fixed > 1e-6)
            if rank == 0:
                print(f"layers.{name:12s} buffer [{start:5d}, {stop:5d}) bucket {bucket}  {key:8s} "
                      f"max |saved - true| {error:.3e}   proposed fix {fixed:.3e}")
    print(f"rank {rank}: {differ} of {2 * len(saved)} tensors differ (proposed fix: {fixed_differ})")
    return int(differ > 0)


if __name__ == "__main__":
    raise SystemExit(main())
