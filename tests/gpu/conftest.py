"""tests/gpu: the training job on the GPUs of this host (skipped, with the reason, without them).

The rest of the suite is pinned to the CPU (tests/conftest.py); these tests launch, in
subprocesses that see the user's GPUs (NCCL), `tests/gpu/forward_worker.py` (one forward and
backward of the job's model from a shared weights file: logits and gradient norms) and
`examples/pretrain_spiral.py` (logged losses), and compare them with tests/gpu/compare.py.
Probing the host also happens in a subprocess, so this process never initialises CUDA.
"""

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from tests.conftest import GPU_ENV, PYTHONPATH, ROOT

SCRIPT = ROOT / "examples" / "pretrain_spiral.py"
WORKER = ROOT / "tests" / "gpu" / "forward_worker.py"
# The debug model on the bundled corpus; shapes FP8 accepts (seq 128, micro-batch 2).
STEPS = ("--train-iters", 20, "--micro-batch-size", 2, "--global-batch-size", 8, "--lr-warmup-iters", 1,
         "--log-interval", 1, "--eval-interval", "none", "--seq-length", 128)
# One forward and backward of the same model (the worker draws one batch of 2 x 128 tokens).
FORWARD = ("--mock-data", "true", "--micro-batch-size", 2, "--global-batch-size", 2, "--seq-length", 128)


@lru_cache(maxsize=None)
def host() -> dict:
    """{"gpus": n, "te": bool, "name": str} of this host, probed in a subprocess."""
    probe = ("import json, torch\n"
             "n = torch.cuda.device_count()\n"
             "te = False\n"
             "if n:\n"
             "    from spiral_megatron.model.layer_specs import have_transformer_engine\n"
             "    te = have_transformer_engine()\n"
             "print(json.dumps({'gpus': n, 'te': te, 'name': torch.cuda.get_device_name(0) if n else ''}))")
    env = dict(GPU_ENV, PYTHONPATH=PYTHONPATH, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        return {"gpus": 0, "te": False, "name": "", "error": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def need(gpus: int = 1, te: bool = False) -> None:
    """Skip, saying why, unless this host has `gpus` CUDA devices (and Transformer Engine)."""
    info = host()
    if info.get("error"):  # CUDA devices were found (the probe imports the package only then)
        pytest.fail(f"probing this host's GPUs failed: {info['error'].strip().splitlines()[-1]}")
    if info["gpus"] < gpus:
        pytest.skip(f"needs {gpus} CUDA GPU(s); this host has {info['gpus']}")
    if te and not info["te"]:
        pytest.skip("needs Transformer Engine (pip install 'spiral_megatron[te]' on a CUDA machine)")


def _run(cmd, cache: Path, **env) -> None:
    env = dict(GPU_ENV, PYTHONPATH=PYTHONPATH, PYTHONWARNINGS="ignore", SPIRAL_CACHE=str(cache), **env)
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def train(tmp_path: Path, name: str, *args, nproc: int = 1, **env) -> list:
    """Run the job from scratch (the same seed draws the same weights in every format and
    backend, spiral_megatron/model/init.py); its per-step losses."""
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT,
          *STEPS, "--save", "none", *args, "--log-json", out / "log.jsonl"], tmp_path.parent / "cache", **env)
    return losses(out / "log.jsonl")


def forward(folder: Path, name: str, *args, weights: Path) -> dict:
    """One forward and backward (forward_worker.py) from `weights`, written there first by a run
    without them (fp32, local spec, Megatron's attention: the reference)."""
    mode = "--load-weights" if weights.is_file() else "--save-weights"
    out = folder / f"{name}.pt"
    _run([sys.executable, WORKER, "--out", out, mode, weights, "--", *FORWARD, *args], folder / "cache")
    import torch

    return torch.load(out)


def losses(path: Path) -> list:
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [r["loss"] for r in sorted((r for r in records if "loss" in r), key=lambda r: r["iteration"])]
