"""Counting the aten ops of a training step: a CPU proxy for the kernels a GPU step launches.

The loop is launch-bound on a GPU (issue 15): what it costs beyond its FLOPs is the number of
ops it dispatches. `count_ops(fn)` runs `fn` under a TorchDispatchMode and counts every aten op
that reaches the dispatcher (views included: each is a Python-to-C++ round trip, even when it
launches no kernel). `step_ops` counts one forward + backward of a model; `loop_overhead`
compares a spiral model with a plain GPT of the same unrolled depth (its N_compute layer calls
as one stack, no loop), so the difference is what the loop adds around its core (resampling,
topology, masks, positions, the shared weights' gradient sums). Issue 23's measure is
spiral-410m's layer counts (4 + 8 x (8,4,2,1) + 4 against a 40-layer GPT) at hidden 128; the
counts do not depend on the width, the batch or the sequence length:

    python -m spiral_megatron.analysis.op_count --flavor spiral-410m --hidden 128 --seq 64
"""

import argparse
from collections import Counter
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name (`aten.mm.default` -> "mm.default") while active."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_ops(fn: Callable[[], object], compiled: bool = False) -> Counter:
    """The aten ops `fn()` dispatches, by name.

    compiled: count with the profiler instead, for code that runs `torch.compile`d graphs
    (dynamo runs a compiled function eagerly while a TorchDispatchMode is active). It counts
    the outermost aten ops only, those dispatched from Python or by autograd's engine, not the
    ops a composite one (linear -> matmul -> mm) calls inside; a compiled graph's fused kernels
    are no aten ops. The two counts differ in what they see: compare like with like.
    """
    if not compiled:
        with OpCounter() as counter:
            fn()
        return counter.counts
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None:
            counts[event.name[len("aten::"):]] += 1
    return counts


def step_ops(model: torch.nn.Module, batch: int = 2, seq: int = 64, vocab: int = 512, seed: int = 0,
             compiled: bool = False) -> Counter:
    """The ops of one training step's forward + backward (loss summed over tokens) of a
    Megatron GPT-like model called as model(tokens, positions, mask, labels=labels).
    The step runs once unmeasured first, so lazy caches (rotary tables, compiled graphs) are
    built outside the count, as they would be after the first step of a run."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    positions = torch.arange(seq).expand(batch, seq)

    def step():
        model(tokens, positions, None, labels=tokens).sum().backward()

    step()
    model.zero_grad(set_to_none=True)
    return count_ops(step, compiled)


def build(flavor: str, hidden: int = 64, heads: int = 4, vocab: int = 512, seq: int = 64, **overrides):
    """A model with `flavor`'s layer counts and schedule at a small width (op counts do not
    depend on the width). Needs Megatron's parallel state (spiral_megatron.parallel.initialize)."""
    from spiral_megatron.config import flavors
    from spiral_megatron.model.spiral_gpt_model import SpiralGPTModel

    fields = dict(hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=4 * hidden,
                  use_cpu_initialization=True, **overrides)
    torch.manual_seed(0)
    return SpiralGPTModel(flavors.get(flavor).config(**fields), vocab_size=vocab, max_sequence_length=seq)


def loop_overhead(flavor: str, batch: int = 2, seq: int = 64, hidden: int = 64, compiled: bool = False,
                  **overrides) -> Dict[str, int]:
    """Ops of one step of `flavor` and of a plain stack of its UNROLLED depth (N_compute layers,
    no loop); their difference is what the loop adds around the core, per step and per iteration.
    compiled: the profiler's count (see `count_ops`), needed with compile_loop_iteration or
    compile_layers."""
    spiral = build(flavor, hidden=hidden, seq=seq, **overrides)
    c = spiral.config
    unrolled = build(flavor, hidden=hidden, seq=seq, num_prelude_layers=c.num_compute_layers,
                     num_core_layers=0, num_coda_layers=0, chunk_sizes=())
    spiral_ops = step_ops(spiral, batch, seq, compiled=compiled).total()
    gpt_ops = step_ops(unrolled, batch, seq, compiled=compiled).total()
    loops = max(c.num_loops, 1)
    return dict(step=spiral_ops, unrolled_gpt=gpt_ops, loop_added=spiral_ops - gpt_ops,
                loop_added_per_iteration=(spiral_ops - gpt_ops) // loops, iterations=c.num_loops)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--hidden", type=int, default=64, help="width (op counts do not depend on it)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--compile-loop-iteration", action="store_true",
                        help="compile the loop's iterations (implies --profiler)")
    parser.add_argument("--compile-layers", action="store_true",
                        help="compile each prelude and coda layer (implies --profiler)")
    parser.add_argument("--profiler", action="store_true", help="count outermost ops with the profiler")
    parser.add_argument("--topology", default=None)
    args = parser.parse_args(argv)
    from spiral_megatron import parallel

    overrides = dict(compile_loop_iteration=args.compile_loop_iteration, compile_layers=args.compile_layers)
    if args.topology:
        overrides["topology"] = args.topology
    parallel.initialize(tensor_parallel=1, pipeline_parallel=1, seed=1234, backend="gloo")
    try:
        compiled = args.profiler or args.compile_loop_iteration or args.compile_layers
        result = loop_overhead(args.flavor, args.batch, args.seq, args.hidden, compiled, **overrides)
    finally:
        parallel.destroy()
    print(" ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    from spiral_megatron.job.run.console import quiet_tool

    with quiet_tool("op_count"):  # Megatron's known-harmless import warnings, counted in one line
        main()
