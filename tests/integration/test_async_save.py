"""Megatron's asynchronous checkpoint save (issue 11, item 10): published when written, and
resuming from it is exact (bitwise on CPU: the forked writer saves a snapshot of the step)."""

from pathlib import Path

import pytest

from spiral_megatron.job.checkpoint.checkpointing import TRACKER
from tests.integration.conftest import TINY, launch, logged

pytestmark = [pytest.mark.checkpoint, pytest.mark.both_releases]  # CI runs it on megatron-core 0.16.1 too


def hidden(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def test_async_save_resumes_exactly(reference, cache_dir, tmp_path):
    _, full, _ = reference
    save = tmp_path / "ckpt"
    first = launch(cache_dir, *TINY, "--async-save", "--exit-interval", 2, "--save", save,
                   "--log-json", tmp_path / "a.jsonl")
    assert "in the background" in first.stdout and f"saved checkpoint {save}/iter_0000002" in first.stdout
    assert (save / TRACKER).read_text() == "2" and hidden(save) == []
    launch(cache_dir, *TINY, "--async-save", "--load", save, "--save", save, "--log-json", tmp_path / "b.jsonl")
    resumed = {**logged(tmp_path / "a.jsonl"), **logged(tmp_path / "b.jsonl")}
    assert sorted(resumed) == [1, 2, 3, 4] and (save / TRACKER).read_text() == "4"
    for it, record in resumed.items():
        assert (record["loss"], record["lr"]) == (full[it]["loss"], full[it]["lr"]), it
