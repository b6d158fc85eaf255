"""Activation memory vs the number of loop iterations T, with and without recomputation (issue 3).

A `1+2RT+1` model (full-resolution loop: chunk sizes all 1, where memory grows fastest with T),
one forward+backward per setting. On a CPU it reports the activations kept for backward at the
end of the forward (unique storages of saved tensors, parameters excluded: exact, via
`torch.autograd.graph.saved_tensors_hooks`); on a GPU also the peak allocated memory of the
step (`torch.cuda.max_memory_allocated`).

    python benchmarks/recompute_memory.py [--hidden 256] [--seq 1024] [--loops 1,2,4,8]
"""

import argparse

import torch

import contextlib

from spiral_megatron.job.run.console import quiet_tool

# Megatron's known-harmless import warnings held from here and counted in one line at the end (as
# the tools do), when run as a script.
QUIET = contextlib.ExitStack()
if __name__ == "__main__":
    QUIET.enter_context(quiet_tool("recompute_memory"))

from spiral_megatron import SpiralConfig, SpiralGPTModel, parallel
from spiral_megatron.model.activation_memory import saved_for_backward

MODES = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full (per layer)": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "loop iterations": dict(recompute_loop_iterations=True),
    "iterations + full": dict(recompute_loop_iterations=True, recompute_granularity="full",
                              recompute_method="uniform", recompute_num_layers=1),
}


def measure(hidden: int, seq: int, loops: int, on_gpu: bool, **recompute):
    """(MiB kept for backward, peak MiB on the GPU or None) of one step."""
    config = SpiralConfig(hidden_size=hidden, num_attention_heads=max(1, hidden // 64), ffn_hidden_size=4 * hidden,
                          num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, chunk_sizes=(1,) * loops,
                          hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not on_gpu,
                          bf16=on_gpu, params_dtype=torch.bfloat16 if on_gpu else torch.float32, **recompute)
    model = SpiralGPTModel(config, vocab_size=512, max_sequence_length=seq)
    if on_gpu:
        model.cuda()
    device = "cuda" if on_gpu else "cpu"
    tokens = torch.randint(0, 512, (1, seq + 1), device=device)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with saved_for_backward(model) as kept:
        loss = model(tokens[:, :-1], torch.arange(seq, device=device)[None], None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
    return sum(kept.values()) / 2**20, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--loops", default="1,2,4,8")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    parallel.initialize(seed=0)
    loops = [int(x) for x in args.loops.split(",")]
    what = "peak allocated MiB (kept for backward MiB)" if on_gpu else "MiB of activations kept for backward"
    print(f"1+2RT+1, hidden {args.hidden}, seq {args.seq}, micro-batch 1, {'GPU bf16' if on_gpu else 'CPU fp32'}: {what}")
    print(f"{'recompute':20s}" + "".join(f"{f'T={t}':>18s}" for t in loops))
    for name, options in MODES.items():
        cells = []
        for t in loops:
            kept, peak = measure(args.hidden, args.seq, t, on_gpu, **options)
            cells.append(f"{peak:.0f} ({kept:.0f})" if peak is not None else f"{kept:.1f}")
        print(f"{name:20s}" + "".join(f"{c:>18s}" for c in cells), flush=True)
    parallel.destroy()


if __name__ == "__main__":
    with QUIET:
        main()
