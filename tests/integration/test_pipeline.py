"""Pipeline parallelism in the main job: PP=2 (loop across stages) against the single-process
reference from the same checkpoint, a PP=2 checkpoint resumed at PP=1, and bad layouts.

Different layouts initialise weights differently, so every comparison starts from a saved
checkpoint: the reference's iteration 2 (model, optimizer and scheduler, resharded to PP=2).
"""

import pytest

from tests.integration.conftest import TINY, checkpoint_at, launch, logged

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint


@pytest.fixture(scope="module")
def pp2(reference, cache_dir, tmp_path_factory):
    """Iterations 3 and 4 at PP=2 on 2 ranks, resumed from the reference's iteration 2."""
    out = tmp_path_factory.mktemp("pp2")
    start = checkpoint_at(reference[0] / "ckpt", 2, out / "start")
    proc = launch(cache_dir, *TINY, "--pipeline-parallel", 2, "--load", start, "--save", out / "ckpt",
                  "--save-interval", 1, "--log-json", out / "log.jsonl", nproc=2)
    return out, logged(out / "log.jsonl"), proc.stdout


def test_pipeline_parallel_losses_match_single_process(reference, pp2):
    _, full, _ = reference
    out, log, stdout = pp2
    assert "resumed from" in stdout and "at iteration 2 (8 samples consumed)" in stdout
    # The cost-balanced partition of the debug flavor, printed at start.
    assert "stage 0: prelude layer 0, iteration 0, iteration 1, iteration 2 (est." in stdout
    assert "stage 1: iteration 3, coda layer 0 (est." in stdout
    assert sorted(log) == [3, 4]
    for it, record in log.items():
        for key in ("loss", "grad_norm", "lr"):
            assert record[key] == pytest.approx(full[it][key], rel=1e-5), (it, key, record[key], full[it][key])
    assert log[4]["val_loss"] == pytest.approx(full[4]["val_loss"], rel=1e-5)


@pytest.mark.both_releases
def test_pipeline_checkpoint_resumes_at_one_stage(reference, pp2, cache_dir, tmp_path):
    """The PP=2 checkpoint of iteration 3 (one copy of the replicated core) at PP=1: the
    model and optimizer reshard, and iteration 4 gives the reference's loss."""
    _, full, _ = reference
    start = checkpoint_at(pp2[0] / "ckpt", 3, tmp_path / "start")
    proc = launch(cache_dir, *TINY, "--load", start, "--save", tmp_path / "ckpt",
                  "--log-json", tmp_path / "log.jsonl")
    assert "at iteration 3 (12 samples consumed)" in proc.stdout
    log = logged(tmp_path / "log.jsonl")
    assert sorted(log) == [4]
    assert log[4]["loss"] == pytest.approx(full[4]["loss"], rel=1e-5)
    assert log[4]["grad_norm"] == pytest.approx(full[4]["grad_norm"], rel=1e-5)


def test_bad_pipeline_layout_fails_before_compute(cache_dir, tmp_path):
    proc = launch(cache_dir, *TINY, "--pipeline-parallel", 2, "--seq-length", 100,
                  "--save", tmp_path / "ckpt", nproc=1, expect_rc=2)
    assert ("seq_length 100 must be a multiple of 8 (every chunk size of (8, 4, 2, 1)) when the loop "
            "spans 2 pipeline stages") in proc.stderr
    assert "iteration" not in proc.stdout and not (tmp_path / "ckpt").exists()
