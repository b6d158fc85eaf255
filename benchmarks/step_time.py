"""Forward+backward step time of SpiralFormer vs a full-resolution looped transformer vs GPT.

Same unique transformer layers for all three, measured side by side in one process
(interleaved rounds, median). Prints each measured time ratio next to the analytic FLOPs ratio
from `spiral_megatron.config.flops`, the memory of each step and, on a GPU, the MFU (analytic training
FLOPs per second / the device's peak from spiral_megatron.job.run.metrics, or --peak-tflops).
Target (issue 9): spiral/looped measured ratio within 1.1x of the analytic ratio.

    python benchmarks/step_time.py [--hidden 512] [--seq 1024] [--rounds 5]          # CPU shape, 1+2R4+1
    python benchmarks/step_time.py --size 410m --seq 4096 --batch 4 [--backend transformer_engine]   # GPU, bf16

Memory: on a GPU the peak allocated memory of the step; on a CPU the activations kept for
backward (saved tensors, parameters excluded), which is what the loop changes.
aten ops: the ops one step dispatches (forward + backward), the CPU proxy of the kernels a GPU
step launches (issue 15). --json writes the table's rows (benchmarks/gpu_check.py reads them).
"""

import argparse
import json
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import contextlib

from spiral_megatron.job.run.console import quiet_tool

# Megatron's known-harmless import warnings held from here and counted in one line at the end (as
# the tools do), when run as a script.
QUIET = contextlib.ExitStack()
if __name__ == "__main__":
    QUIET.enter_context(quiet_tool("step_time"))

from spiral_megatron import SpiralConfig, SpiralGPTModel, parallel
from spiral_megatron.config import flavors, flops
from spiral_megatron.model.activation_memory import saved_for_backward
from spiral_megatron.model.layer_specs import get_spiral_model_spec
from spiral_megatron.job.run.metrics import device_peak_tflops


def configs(args, on_gpu: bool):
    runtime = dict(hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not on_gpu,
                   bf16=on_gpu, params_dtype=torch.bfloat16 if on_gpu else torch.float32)
    if args.size:
        return {f"{kind}-{args.size}": flavors.get(f"{kind}-{args.size}").config(**runtime)
                for kind in ("spiral", "looped", "gpt")}
    shape = dict(hidden_size=args.hidden, num_attention_heads=args.heads, ffn_hidden_size=4 * args.hidden, **runtime)
    loop = dict(num_prelude_layers=1, num_core_layers=2, num_coda_layers=1)
    return {
        "spiral 8,4,2,1": SpiralConfig(**shape, **loop, chunk_sizes=(8, 4, 2, 1)),
        "looped 1,1,1,1": SpiralConfig(**shape, **loop, chunk_sizes=(1, 1, 1, 1)),
        "gpt (4 layers)": SpiralConfig(**shape, num_prelude_layers=4),
    }


def step(model, tokens):
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (views included: each is a dispatch)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> Counter:
    """The aten ops `fn()` dispatches, by name."""
    with _OpCounter() as counter:
        fn()
    return counter.counts


def timed(model, tokens, on_gpu: bool) -> float:
    if on_gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(model, tokens)
    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", help="a paper size (160m, 410m, 1.4b): spiral-/looped-/gpt-<size> flavors")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backend", default="local", help="layer specs: local or transformer_engine")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    parallel.initialize(seed=0)
    torch.manual_seed(0)
    models = {}
    for name, c in configs(args, on_gpu).items():
        models[name] = SpiralGPTModel(c, args.vocab, args.seq, spec=get_spiral_model_spec(c, args.backend)).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    memory = {}
    for name, model in models.items():  # warm-up, and the memory of one step
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        with saved_for_backward(model) as kept:
            step(model, tokens)
        memory[name] = torch.cuda.max_memory_allocated() if on_gpu else sum(kept.values())
    ops = {name: sum(count_ops(lambda: step(model, tokens)).values()) for name, model in models.items()}
    times = {name: [] for name in models}
    for r in range(args.rounds):
        for name, model in models.items():
            times[name].append(timed(model, tokens, on_gpu))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()), flush=True)

    base = next(n for n in models if n.startswith("looped"))
    median = {n: statistics.median(t) for n, t in times.items()}
    analytic = {n: flops.training_flops(m.config, args.seq, args.vocab) for n, m in models.items()}
    peak = device_peak_tflops(args.peak_tflops)
    where = torch.cuda.get_device_name() + f", bf16, {args.backend} spec" if on_gpu else \
        f"CPU fp32, threads={torch.get_num_threads()}"
    print(f"\nseq={args.seq} batch={args.batch} vocab={args.vocab} ({where})")
    mem_label = "peak GiB" if on_gpu else "act. MiB"
    print(f"{'model':16s} {'params':>11s} {'step s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {mem_label:>9s} "
          f"{'aten ops':>9s} {'measured/looped':>16s} {'analytic/looped':>16s} {'measured/analytic':>18s}")
    rows = []
    for n in models:
        measured, expected = median[n] / median[base], analytic[n] / analytic[base]
        params = sum(p.numel() for p in models[n].parameters())
        tflops = analytic[n] * args.batch / median[n] / 1e12
        mfu = f"{100 * tflops / peak:5.1f}%" if peak else "n/a"
        mem = memory[n] / (2**30 if on_gpu else 2**20)
        print(f"{n:16s} {params:11d} {median[n]:8.3f} {tflops:8.3f} {mfu:>6s} {mem:9.2f} {ops[n]:9d} "
              f"{measured:16.3f} {expected:16.3f} {measured / expected:18.3f}")
        rows.append(dict(model=n, seq=args.seq, batch=args.batch, params=params, step_s=median[n],
                         tflops=tflops, mfu=tflops / peak if peak else None, memory_gib=memory[n] / 2**30,
                         memory_kind="peak" if on_gpu else "activations", aten_ops=ops[n],
                         measured_vs_analytic=measured / expected))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    parallel.destroy()


if __name__ == "__main__":
    with QUIET:
        main()
