"""Compare the loss curves of two runs of pretrain_spiral.py (their --log-json files).

    python tools/compare_losses.py reference.jsonl other.jsonl [--rtol 1e-4]

The same job from scratch with the same seed must give the same losses at every parallel
layout (weights are drawn layout-independently): prints every step side by side and exits 0
(PASS) when every step agrees within rtol, 1 (FAIL) otherwise.
"""

import argparse
import json
import sys
from pathlib import Path


def losses(path) -> dict:
    """iteration -> training loss of one --log-json file (evaluation-only lines skipped)."""
    records = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return {r["iteration"]: r["loss"] for r in records if "loss" in r}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance per step (fp32: 1e-4; bf16: 2e-2)")
    args = ap.parse_args(argv)
    ref, other = losses(args.reference), losses(args.other)
    steps = sorted(set(ref) & set(other))
    if not steps:
        print(f"FAIL: no common logged iterations in {args.reference} and {args.other}")
        return 1
    worst = 0.0
    print(f"{'iteration':>9s} {'reference':>12s} {'other':>12s} {'rel diff':>9s}")
    for it in steps:
        rel = abs(other[it] - ref[it]) / max(abs(ref[it]), 1e-12)
        worst = max(worst, rel)
        print(f"{it:9d} {ref[it]:12.6f} {other[it]:12.6f} {rel:9.1e}")
    verdict = "PASS" if worst <= args.rtol else "FAIL"
    print(f"{verdict}: {len(steps)} steps, largest relative difference {worst:.1e} (rtol {args.rtol:g})")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
