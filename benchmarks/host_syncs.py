"""Host reads of tensor values per training step (`.item()`, `.tolist()`, `bool()`, `float()`,
`int()` of a tensor), by call site: the main job's loop run in this process, one rank.

    python benchmarks/host_syncs.py [--steps 8]

On a GPU each read of a device tensor waits for the device (a host sync); on a CPU nothing
waits, so this counts where the syncs would be (issue 15). Two runs, of `steps` and of
2 x `steps` steps, logged and saved only at their end: the difference / `steps` is what
every other step costs, apart from the run's start and end. The job runs the debug flavor on
mock data, without saving. `--gpu-debug` (on a GPU) also counts the syncs CUDA reports
(torch.cuda.set_sync_debug_mode("warn")).
"""

import argparse
import collections
import contextlib
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def _call_site() -> str:
    """The first frame outside torch, this file and the CPU shim: `package/file.py:function`."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/" in path or path.endswith(("host_syncs.py", "cuda_on_cpu.py")):  # the CPU shim relays
            continue
        for root in ("/megatron/", "/spiral_megatron/"):
            if root in path:
                return root.strip("/") + "/" + path.split(root, 1)[1] + ":" + frame.name
        return Path(path).name + ":" + frame.name
    return "?"


@contextlib.contextmanager
def counting(counts: collections.Counter):
    """Count every read of a tensor's value into `counts` by call site (torch.Tensor's methods
    are wrapped for the duration: a benchmark's instrument, never done in the package)."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    inside = [False]  # a torch function mode (the CPU shim) calls the wrapped method again: count once

    def wrap(fn):
        def read(self, *args, **kwargs):
            if inside[0]:
                return fn(self, *args, **kwargs)
            counts[_call_site()] += 1
            inside[0] = True
            try:
                return fn(self, *args, **kwargs)
            finally:
                inside[0] = False
        return read

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def reads_of_run(steps: int, gpu_debug: bool) -> collections.Counter:
    """Reads inside Trainer.run of a `steps`-step debug job on mock data, by call site."""
    from spiral_megatron.job.run import loop
    from spiral_megatron.job.settings.resolve import resolve

    job = resolve(["--mock-data", "true", "--train-iters", str(steps), "--log-interval", str(steps),
                       "--eval-interval", "null", "--save", "null"],
                      ROOT / "examples" / "configs" / "debug-cpu.yaml")
    counts = collections.Counter()
    run = loop.Trainer.run

    def counted_run(self, *args, **kwargs):
        with counting(counts), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if gpu_debug:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                return run(self, *args, **kwargs)
            finally:
                if gpu_debug:
                    torch.cuda.set_sync_debug_mode(0)
                    counts["CUDA-reported syncs"] += sum("synchroniz" in str(w.message) for w in caught)

    loop.Trainer.run = counted_run
    try:
        loop.run(job)
    finally:
        loop.Trainer.run = run
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--gpu-debug", action="store_true", help="also count CUDA's reported syncs")
    args = ap.parse_args(argv)
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        os.environ.setdefault(key, value)
    short, long = reads_of_run(args.steps, args.gpu_debug), reads_of_run(2 * args.steps, args.gpu_debug)
    per_step = {site: (long[site] - short[site]) / args.steps for site in long | short}
    print(f"\nhost reads of tensor values per training step ({args.steps} more steps, not logged or saved):")
    for site, n in sorted(per_step.items(), key=lambda kv: -kv[1]):
        if n:
            print(f"  {n:5.2f}  {site}")
    ours = sum(n for site, n in per_step.items() if site.startswith("spiral_megatron/"))
    print(f"  {sum(per_step.values()):5.2f}  total ({ours:.2f} in spiral_megatron)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
