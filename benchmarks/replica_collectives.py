"""Collectives and bytes per step of the core replicas' cross-stage gradient sum (issue 5).

Counts on a CPU, in one process: the pipeline plan says which stages hold a replica of the core;
the core is built at full width without drawing weights (`torch.empty`, no pages touched) to
get its exact parameter tensors; Megatron DDP is built around a narrow stand-in core of the
same structure (bucket counts do not depend on width) under the old marking (every core
parameter `shared_embedding`: one bucket each) and the new one (first and last: three buckets).

    python benchmarks/replica_collectives.py [--flavor spiral-1.4b] [--pp 4] [--dp 8]
"""

import argparse

import torch

import contextlib

from spiral_megatron.job.run.console import quiet_tool

# Megatron's known-harmless import warnings held from here and counted in one line at the end (as
# the tools do), when run as a script.
QUIET = contextlib.ExitStack()
if __name__ == "__main__":
    QUIET.enter_context(quiet_tool("replica_collectives"))

from spiral_megatron.config import flavors
from spiral_megatron import parallel
from spiral_megatron.parallel import pipeline_plan
from spiral_megatron.model.layer_specs import get_spiral_model_spec
from spiral_megatron.model.loop import SpiralLoop


def core(config):
    return SpiralLoop(config, get_spiral_model_spec(config).loop, iterations=range(0)).core


def core_buckets(flavor, old_marking: bool, distributed_optimizer: bool) -> int:
    """DDP buckets holding core parameters, on a width-64 stand-in with the same layers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = flavor.config(hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, use_cpu_initialization=True)
    block = core(config)
    params = list(block.parameters())
    for p in params if old_marking else (params[0], params[-1]):
        p.shared_embedding = True
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=distributed_optimizer), block)
    return sum(len(b.buckets) for b in ddp.buffers)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="spiral-1.4b")
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--dp", type=int, default=8, help="data-parallel size (distributed optimizer shards)")
    ap.add_argument("--seq", type=int, default=4096)
    args = ap.parse_args()
    parallel.initialize(seed=0, backend="gloo")
    flavor = flavors.get(args.flavor)
    config = flavor.config(use_cpu_initialization=True, perform_initialization=False,
                           pipeline_model_parallel_size=args.pp, pipeline_dtype=torch.float32)
    stages = pipeline_plan.plan(config, args.seq, flavor.vocab_size, args.pp, config.loop_placement, None)
    holders = [s for s, st in enumerate(stages) if st.span("loop")]
    numels = [p.numel() for p in core(flavor.config(use_cpu_initialization=True, perform_initialization=False)).parameters()]
    fp32 = 4 * sum(numels)  # grad_reduce_in_fp32: the main grads are fp32
    print(f"{args.flavor} at PP{args.pp}: the core ({len(numels)} tensors, {sum(numels) / 1e6:.1f}M parameters) is "
          f"replicated on stages {holders}; per rank of those stages, per optimizer step:")
    rows = [
        ("before: one all-reduce per core tensor", len(numels), fp32, core_buckets(flavor, True, True)),
        ("after, plain DDP: the core's range of the grad buffer", 1, fp32, core_buckets(flavor, False, False)),
        (f"after, distributed optimizer (DP{args.dp}): owned shards", 1, fp32 // args.dp,
         core_buckets(flavor, False, True)),
    ]
    print(f"{'':58s} {'collectives':>11s} {'MB all-reduced':>15s} {'core DDP buckets':>17s}")
    for name, count, nbytes, buckets in rows:
        print(f"{name:58s} {count:11d} {nbytes / 2**20:15.1f} {buckets:17d}")
    print("(before: under the distributed optimizer every core tensor was its own DDP bucket; "
          "plain DDP put the core in its regular buckets)")
    parallel.destroy()


if __name__ == "__main__":
    with QUIET:
        main()
