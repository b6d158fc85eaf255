"""Forward+backward step time of SpiralFormer vs a full-resolution looped transformer vs GPT.

Same unique transformer layers for all three (`1+2R4+1`: GPT has the 4 layers once), a shape
where matmuls dominate, measured side by side in one process (interleaved rounds, median).
Prints each measured time ratio next to the analytic FLOPs ratio from `spiral_megatron.flops`.
Target (issue 2): spiral/looped measured ratio within 1.1x of the analytic ratio.

    python benchmarks/step_time.py [--hidden 512] [--seq 1024] [--rounds 5]
"""

import argparse
import statistics
import time

import torch

from spiral_megatron import SpiralConfig, SpiralGPTModel, flops, parallel


def configs(hidden: int, heads: int):
    shape = dict(hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=4 * hidden,
                 hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True)
    loop = dict(num_prelude_layers=1, num_core_layers=2, num_coda_layers=1)
    return {
        "spiral 8,4,2,1": SpiralConfig(**shape, **loop, chunk_sizes=(8, 4, 2, 1)),
        "looped 1,1,1,1": SpiralConfig(**shape, **loop, chunk_sizes=(1, 1, 1, 1)),
        "gpt (4 layers)": SpiralConfig(**shape, num_prelude_layers=4),
    }


def step(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    parallel.initialize(seed=0)
    torch.manual_seed(0)
    models = {name: SpiralGPTModel(c, args.vocab, args.seq) for name, c in configs(args.hidden, args.heads).items()}
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    times = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        step(model, tokens)
    for r in range(args.rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            step(model, tokens)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()), flush=True)

    base = "looped 1,1,1,1"
    median = {n: statistics.median(t) for n, t in times.items()}
    analytic = {n: flops.training_flops(m.config, args.seq, args.vocab) for n, m in models.items()}
    print(f"\nd={args.hidden} heads={args.heads} seq={args.seq} batch={args.batch} vocab={args.vocab} "
          f"threads={torch.get_num_threads()}")
    print(f"{'model':16s} {'params':>10s} {'step s':>8s} {'GFLOP/s':>8s} {'measured/looped':>16s} "
          f"{'analytic/looped':>16s} {'measured/analytic':>18s}")
    for n in models:
        measured, expected = median[n] / median[base], analytic[n] / analytic[base]
        params = sum(p.numel() for p in models[n].parameters())
        gflops = analytic[n] * args.batch / median[n] / 1e9
        print(f"{n:16s} {params:10d} {median[n]:8.3f} {gflops:8.1f} {measured:16.3f} {expected:16.3f} "
              f"{measured / expected:18.3f}")
    parallel.destroy()


if __name__ == "__main__":
    main()
