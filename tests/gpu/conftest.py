"""tests/gpu: the training job on the GPUs of this host (skipped, with the reason, without them).

The rest of the suite is pinned to the CPU (tests/conftest.py); these tests launch
`examples/pretrain_spiral.py` in subprocesses that see the user's GPUs (NCCL), and compare
their logged losses. Probing the host also happens in a subprocess, so this process never
initialises CUDA.
"""

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from tests.conftest import GPU_ENV, ROOT

SCRIPT = ROOT / "examples" / "pretrain_spiral.py"
# A few steps of the debug model on mock data; shapes FP8 accepts (seq 128, micro-batch 2).
STEPS = ("--train-iters", 3, "--micro-batch-size", 2, "--global-batch-size", 8, "--lr-warmup-iters", 1,
         "--log-interval", 1, "--eval-interval", "none", "--mock-data", "true", "--seq-length", 128)


@lru_cache(maxsize=None)
def host() -> dict:
    """{"gpus": n, "te": bool, "name": str} of this host, probed in a subprocess."""
    probe = ("import json, torch\n"
             "n = torch.cuda.device_count()\n"
             "te = False\n"
             "if n:\n"
             "    from spiral_megatron.layer_specs import have_transformer_engine\n"
             "    te = have_transformer_engine()\n"
             "print(json.dumps({'gpus': n, 'te': te, 'name': torch.cuda.get_device_name(0) if n else ''}))")
    env = dict(GPU_ENV, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        return {"gpus": 0, "te": False, "name": "", "error": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def need(gpus: int = 1, te: bool = False) -> None:
    """Skip, saying why, unless this host has `gpus` CUDA devices (and Transformer Engine)."""
    info = host()
    if info["gpus"] < gpus:
        pytest.skip(f"needs {gpus} CUDA GPU(s); this host has {info['gpus']}"
                    + (f" ({info['error'].strip().splitlines()[-1]})" if info.get("error") else ""))
    if te and not info["te"]:
        pytest.skip("needs Transformer Engine (pip install 'spiral_megatron[te]' on a CUDA machine)")


def train(tmp_path: Path, name: str, *args, nproc: int = 1) -> list:
    """Run the job from scratch; its per-step losses."""
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(SCRIPT), *map(str, STEPS), "--save", "none", *map(str, args), "--log-json", str(out / "log.jsonl")]
    env = dict(GPU_ENV, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", SPIRAL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return losses(out / "log.jsonl")


def losses(path: Path) -> list:
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [r["loss"] for r in sorted((r for r in records if "loss" in r), key=lambda r: r["iteration"])]
