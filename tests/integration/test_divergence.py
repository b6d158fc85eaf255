"""A diverging run (issue 11, item 8): Megatron-LM's spiky-loss check stops it before the
diverged step is saved, and the message says what the latest checkpoint holds."""

import re

import pytest

from spiral_megatron.job.checkpoint.checkpointing import TRACKER
from spiral_megatron.job.run.divergence import LargeValueCheck
from tests.integration.conftest import TINY, launch

pytestmark = pytest.mark.checkpoint  # CI runs it on both megatron-core releases


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
