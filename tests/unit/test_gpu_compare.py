"""The logic of tests/gpu on CPU: format-derived tolerances, comparisons that fail on a part
without gradient or a non-finite value, and the forward worker from a shared weights file."""

import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.formats import MIN_LOSS_DROP, UNIT_ROUNDOFF, loss_change_failures, tolerance
from tests.gpu.compare import PARTS, forward_failures, part_norms

DEPTH = 10  # the debug flavor's N_compute: 1 + 2 x 4 + 1


def test_tolerances_follow_the_unit_roundoff_of_the_formats():
    assert UNIT_ROUNDOFF["bf16"] == 2 ** -8 and UNIT_ROUNDOFF["e4m3"] == 2 ** -4
    bf16 = tolerance(("fp32", "bf16"), DEPTH)
    assert bf16 == pytest.approx(2 * math.sqrt(DEPTH) * 2 ** -8, rel=1e-6)  # fp32's share is negligible
    assert tolerance(("bf16", "bf16"), DEPTH) == pytest.approx(math.sqrt(2) * bf16, rel=1e-6)  # both round
    assert tolerance(("fp32", "bf16"), DEPTH, passes=2) == pytest.approx(math.sqrt(2) * bf16)  # + backward
    assert tolerance(("fp32", "fp32"), DEPTH) < 1e-5 < tolerance(("fp32", "fp16"), DEPTH) < bf16
    assert bf16 < tolerance(("bf16", "e4m3"), DEPTH)


ROUTER = "loop.topology.write_router.weight"  # a small gradient next to a large one in its part


def result(seed: int = 0, scale: float = 0.0, router_factor: float = 1.0) -> dict:
    """A worker result: logits and gradients, perturbed by relative noise `scale`; the router's
    gradient (1e-4 of the others) multiplied by `router_factor`."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 16, 32, generator=g)
    grads = {f"{part}weight": torch.randn(8, 8, generator=g) for part in PARTS}
    grads[ROUTER] = 1e-4 * router_factor * torch.randn(4, 8, generator=g)
    noise = torch.Generator().manual_seed(seed)
    logits = logits * (1 + scale * torch.randn(logits.shape, generator=noise))
    grads = {n: t * (1 + scale * torch.randn(t.shape, generator=noise)) for n, t in grads.items()}
    norms = part_norms(grads)
    return {"logits": logits, "group_norms": norms, "grad_norm": math.sqrt(sum(n * n for n in norms.values())),
            "grads": grads}


def test_rounding_noise_of_the_format_passes():
    tol = tolerance(("fp32", "bf16"), DEPTH)
    assert forward_failures(result(), result(seed=1, scale=2 ** -8), tol, tol) == []


def test_a_part_without_gradient_fails_whatever_the_tolerance():
    run = result()
    run["group_norms"]["loop.core."] = 0.0
    failures = forward_failures(result(), run, 1.0, 1.0)
    assert any("zero or not finite in ['loop.core.']" in f for f in failures), failures


def test_one_wrong_parameter_gradient_fails_though_every_norm_holds():
    """The router's gradient (1e-4 of the others) doubled moves its part's norm by 1e-8: only
    the per-parameter comparison sees it, at its share of the total norm (fp32 vs fp32)."""
    tol = tolerance(("fp32", "fp32"), DEPTH, passes=2)
    ref = result()
    failures = forward_failures(ref, result(router_factor=2.0), tol, tol)
    assert len(failures) == 1 and failures[0].startswith(f"gradient of {ROUTER}: error "), failures
    noise = result()  # noise at 1e-4 of the router's own norm (over tol), far under its share of the total
    noise["grads"][ROUTER] = noise["grads"][ROUTER] * (1 + 1e-4 * torch.randn(4, 8, generator=torch.Generator().manual_seed(1)))
    assert forward_failures(ref, noise, tol, tol) == []
    missing = result()
    del missing["grads"][ROUTER]
    assert forward_failures(result(), missing, tol, tol) == [
        f"gradients of different parameters: missing ['{ROUTER}'], unexpected []"]


def test_non_finite_or_distant_values_fail():
    run = result()
    run["logits"][0, 0, 0] = float("nan")
    assert any(f.startswith("logits: relative error inf") for f in forward_failures(result(), run, 1.0, 1.0))
    far = result(seed=1, scale=0.2)
    failures = forward_failures(result(), far, tolerance(("fp32", "bf16"), DEPTH), 1.0)
    assert len(failures) == 1 and failures[0].startswith("logits: relative error 2."), failures
    assert any(f.startswith("gradient norm of all:") for f in forward_failures(result(), far, 1.0, 1e-3))


def test_a_parameter_outside_the_parts_is_refused():
    with pytest.raises(ValueError, match="parameter rotary.inv_freq is in none of the compared parts"):
        part_norms({"rotary.inv_freq": torch.ones(2)})


def test_the_loss_must_fall_and_fall_alike():
    ref = [6.26, 6.0, 5.6, 5.33]  # the fp32 job on CPU: 6.2578 -> 5.3270 over 20 steps
    assert loss_change_failures(ref, [6.26, 6.0, 5.6, 5.34], 0.035) == []
    assert "loss change 0.0000 vs 0.9300" in loss_change_failures(ref, [6.26] * 4, 0.035)[0]
    flat = loss_change_failures([6.26, 6.25], [6.26, 6.25], 0.035)
    assert flat == [f"the reference's loss fell 0.0100 < {MIN_LOSS_DROP} over 2 steps"]
    assert loss_change_failures(ref, [6.26, float("nan"), 5.6, 5.3], 1.0) == ["a loss is not finite"]


def worker(tmp_path, name: str, mode: str, *job) -> dict:
    out = tmp_path / f"{name}.pt"
    cmd = [sys.executable, str(ROOT / "tests" / "gpu" / "forward_worker.py"), "--out", str(out), mode,
           str(tmp_path / "weights.pt"), "--", "--mock-data", "true", "--micro-batch-size", "2",
           "--global-batch-size", "2", *job]
    # A plain process of its own: not this one's rendezvous (the megatron fixture), nor the
    # NVTE_*_ATTN that models built here pinned (Megatron's LanguageModule sets them).
    inherited = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NVTE_FLASH_ATTN",
                 "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", SPIRAL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return torch.load(out)


def test_forward_worker_starts_every_run_from_the_shared_weights(tmp_path):
    """The reference writes the weights; a run with another seed (other weights of its own) and
    SDPA loads them and gives the same logits and gradients, every part with a gradient."""
    ref = worker(tmp_path, "ref", "--save-weights", "--attention-backend", "unfused")
    run = worker(tmp_path, "run", "--load-weights", "--attention-backend", "flash", "--seed", "7")
    assert (ref["attention"], run["attention"]) == ("DotProductAttention", "SDPAttention")
    assert sorted(ref["group_norms"]) == sorted(PARTS) and all(n > 0 for n in ref["group_norms"].values())
    tol = tolerance(("fp32", "fp32"), DEPTH)
    assert forward_failures(ref, run, tol, tol) == []
    assert set(ref["grads"]) == set(run["grads"]) and all(g.norm() > 0 for g in ref["grads"].values())
    assert ref["logits"].shape == (2, 128, 512) and ref["loss"] == pytest.approx(math.log(512), rel=0.02)
