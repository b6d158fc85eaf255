"""The GPU check anyone can run (issue 15): one H100/H200, no Transformer Engine, under 8 minutes.

    python benchmarks/gpu_check.py [--out runs/gpu_check]
    python benchmarks/gpu_check.py --cpu-smoke      # the same three steps at tiny sizes, on CPU
    python benchmarks/gpu_check.py --dry-run        # print the commands, run nothing

1. `pytest tests/gpu` (each test skips, with the reason, what the host cannot run);
2. benchmarks/step_time.py at 410m, seq 4096, batch 2 and 8: spiral, looped and gpt side by
   side (step time, MFU, peak memory, aten ops per step, measured vs analytic FLOPs ratio);
3. the main job, 20 steps of spiral-410m on mock data (torchrun, one process): tokens/s, MFU
   and memory, averaged over the logged steps after the first log line (warm-up).
Then one summary table, printed and written to OUT/summary.txt; each step's full output is
in OUT/<step>.log. A step that fails or runs out of time is reported as such; the others run.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    """One command of the check and what to read back from it."""

    name: str
    command: List[str]
    timeout_s: int
    result_file: Optional[Path] = None  # JSON rows (step_time) or JSON lines (the job's --log-json)
    outcome: Dict = field(default_factory=dict)  # filled by run_step


def plan(out: Path, cpu_smoke: bool) -> List[Step]:
    """The check's steps; `cpu_smoke`: the same commands at sizes a CPU runs in seconds."""
    py = sys.executable
    smoke_cap = 600  # a shared CPU can be very slow; the 8-minute budget is the GPU run's
    steps = [Step("tests_gpu", [py, "-m", "pytest", "-q", "-rs", "tests/gpu"], smoke_cap if cpu_smoke else 180)]
    sizes = ["--hidden", "64", "--heads", "4", "--seq", "64", "--vocab", "512", "--rounds", "1"] if cpu_smoke \
        else ["--size", "410m", "--seq", "4096", "--vocab", "50304", "--rounds", "3"]
    for batch in (2, 8):
        rows = out / f"step_time_b{batch}.json"
        steps.append(Step(f"step_time_b{batch}", [py, "benchmarks/step_time.py", *sizes, "--batch", str(batch),
                                                  "--json", str(rows)], smoke_cap if cpu_smoke else 80, rows))
    log = out / "job.jsonl"
    model = ["--model.flavor", "debug", "--seq-length", "128", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--precision", "fp32", "--use-distributed-optimizer", "false"] \
        if cpu_smoke else ["--micro-batch-size", "4", "--global-batch-size", "16", "--tokenizer-vocab-size", "50304"]
    iters = ["--train-iters", "4", "--log-interval", "2"] if cpu_smoke else ["--train-iters", "20", "--log-interval", "5"]
    job = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "examples/pretrain_spiral.py",
           "--config", "examples/configs/spiral-410m.yaml", *model, "--mock-data", "true", *iters,
           "--lr-warmup-iters", "2", "--eval-interval", "null", "--save", "null", "--log-json", str(log)]
    steps.append(Step("job_spiral_410m", job, smoke_cap if cpu_smoke else 120, log))  # GPU caps: 460 s in all
    return steps


def run_step(step: Step, out: Path) -> None:
    """Run `step`, its output into OUT/<name>.log; fills step.outcome (rc, seconds, results)."""
    if step.result_file is not None and step.result_file.exists():
        step.result_file.unlink()  # the job's --log-json appends
    started = time.time()
    with open(out / f"{step.name}.log", "w") as log:
        try:
            rc = subprocess.run(step.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                timeout=step.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    step.outcome = dict(rc=rc, seconds=time.time() - started, log=(out / f"{step.name}.log").read_text())


def pytest_line(log: str) -> str:
    """pytest's last summary line (`3 passed, 2 skipped in 41.2s`), or what went wrong."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", log, re.M)
    return found[-1] if found else "no pytest summary (see the log)"


def job_rates(records: List[dict]) -> Optional[dict]:
    """tokens/s, MFU and memory of the job's logged steps, the first log line (warm-up) left out."""
    steps = [r for r in records if "loss" in r]
    steady = steps[1:] or steps
    if not steady:
        return None
    mean = lambda key: sum(r[key] for r in steady) / len(steady) if all(r.get(key) is not None for r in steady) else None
    return dict(tokens_per_sec=mean("tokens_per_sec"), mfu=mean("mfu"), memory_gib=max(r["memory_gib"] for r in steady),
                steps=steps[-1]["iteration"], loss=steps[-1]["loss"])


def summary(steps: List[Step], where: str) -> str:
    """The one table of the check."""
    pct = lambda x: f"{100 * x:.1f}%" if x is not None else "n/a"
    lines = [f"GPU check: {where}", ""]
    for step in steps:
        o = step.outcome
        status = "ok" if o.get("rc") == 0 else f"FAILED ({o.get('rc')})"
        lines.append(f"{step.name}: {status}, {o.get('seconds', 0):.0f} s")
        if step.name == "tests_gpu":
            lines.append(f"  {pytest_line(o.get('log', ''))}")
        elif step.name.startswith("step_time") and step.result_file.exists():
            rows = json.loads(step.result_file.read_text())
            lines.append(f"  {'model':16s} {'seq':>5s} {'batch':>5s} {'step s':>8s} {'MFU':>6s} {'GiB':>7s} "
                         f"{'aten ops':>9s} {'measured/analytic':>18s}")
            for r in rows:
                lines.append(f"  {r['model']:16s} {r['seq']:5d} {r['batch']:5d} {r['step_s']:8.3f} "
                             f"{pct(r['mfu']):>6s} {r['memory_gib']:7.2f} {r['aten_ops']:9d} "
                             f"{r['measured_vs_analytic']:18.3f}")
        elif step.name.startswith("job") and step.result_file.exists():
            records = [json.loads(line) for line in step.result_file.read_text().splitlines() if line.strip()]
            rates = job_rates(records)
            if rates:
                lines.append(f"  {rates['steps']} steps, last loss {rates['loss']:.3f}: "
                             f"{rates['tokens_per_sec']:,.0f} tokens/s, MFU {pct(rates['mfu'])}, "
                             f"memory {rates['memory_gib']:.2f} GiB")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="folder for the logs and summary.txt")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks this script, measures nothing")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args(argv)
    out = Path(args.out)
    steps = plan(out, args.cpu_smoke)
    if args.dry_run:
        print("\n".join(" ".join(s.command) for s in steps))
        return 0
    import torch  # here, not above: --dry-run needs no torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_check: no CUDA GPU here; use --cpu-smoke to check the script on CPU", file=sys.stderr)
        return 2
    where = "CPU smoke run (tiny sizes: nothing measured)" if args.cpu_smoke else \
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, local layer specs (no TE)"
    out.mkdir(parents=True, exist_ok=True)
    for step in steps:
        print(f"gpu_check: {step.name} ...", flush=True)
        run_step(step, out)
    table = summary(steps, where)
    (out / "summary.txt").write_text(table)
    print("\n" + table + f"written to {out / 'summary.txt'}")
    return 0 if all(s.outcome.get("rc") == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
