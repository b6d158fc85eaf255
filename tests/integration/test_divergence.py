"""A diverging run (issue 11, item 8): Megatron-LM's spiky-loss check stops it before the
diverged step is saved, and the message says what the latest checkpoint holds. Weights that
are not finite are never saved (issue 21, item 3), NaN included."""

import math
import re
import subprocess
import sys

import pytest
import torch

from spiral_megatron.job.checkpoint.checkpointing import TRACKER
from spiral_megatron.job.run.divergence import LargeValueCheck, largest_abs_weight
from tests.integration.conftest import ROOT, TINY, environment, launch
from tests.tiny import tiny_model

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint


def test_spiky_loss_check_stops_before_saving(cache_dir, tmp_path):
    save = tmp_path / "ckpt"
    proc = launch(cache_dir, *TINY, "--lr", 3.0, "--min-lr", 3.0, "--lr-warmup-iters", 0, "--clip-grad", 0,
                  "--save-interval", 1, "--save", save, "--check-for-spiky-loss", expect_rc=1)
    assert re.search(r"spiky loss \d+\.?\d* \(>= 10x the largest of the first 1 steps \(6\.2\d*\)\) at iteration 2: "
                     r"stopping, this step is not saved; latest checkpoint: iteration 1", proc.stderr), proc.stderr
    assert "so it is not a good checkpoint; the one before it: none" in proc.stderr
    assert (save / TRACKER).read_text() == "1" and not (save / "iter_0000002").exists()


def test_large_value_check_follows_megatrons_rule():
    check = LargeValueCheck(factor=10, samples=3)
    assert [check.check(v) for v in (6.0, 5.0, float("nan"), 4.0, 59.0, 60.0)] == [False] * 5 + [True]
    assert check.check(30.0) is False and check.max == 6.0  # the reference is the first 3 values


def test_a_nan_weight_on_one_rank_stops_the_job_before_it_saves(cache_dir, tmp_path):
    """NaN in the last parameter of rank 1 after step 2, at DP=2: the save of step 2 is
    refused. Before, Python's max over tensors and gloo's all-reduce MAX each dropped the NaN:
    step 2 was saved, and the run stopped one step later on a NaN loss."""
    save = tmp_path / "ckpt"
    planted = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "integration" / "planted_weight.py"), "nan", "2", "1",
               *map(str, (*TINY, "--save", save))]
    proc = subprocess.run(planted, capture_output=True, text=True, timeout=300, env=environment(cache_dir), cwd=ROOT)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("weights not finite (nan) at iteration 2: stopping, this step is not saved; no checkpoint in"
            in proc.stderr), proc.stderr[-3000:]
    assert not save.exists() or not any(save.glob("iter_*")), sorted(p.name for p in save.iterdir())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_largest_abs_weight_sees_every_non_finite_entry(megatron, value):
    """One entry of one parameter (not the first) planted; otherwise the max over every entry."""
    params = list(tiny_model().parameters())
    assert largest_abs_weight(params) == torch.cat([p.detach().abs().flatten() for p in params]).max().item()
    with torch.no_grad():
        params[len(params) // 2].view(-1)[3] = value
    found = largest_abs_weight(params)
    assert math.isnan(found) if math.isnan(value) else found == math.inf
