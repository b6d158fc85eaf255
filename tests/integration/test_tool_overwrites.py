"""The tools over existing outputs (issue 11, items 4-6): convert_from_hf.py refuses a training
folder, convert_to_hf.py --force swaps atomically and cleans what a killed run left,
preprocess_data.py refuses to overwrite and leaves nothing behind on an error."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spiral_megatron.job.checkpoint.checkpointing import TRACKER
from tests.integration.conftest import ROOT, environment

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint


def tool(cache_dir, name, *args, expect_rc=0):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=dict(environment(cache_dir), HF_HUB_OFFLINE="1"), cwd=ROOT)
    assert proc.returncode == expect_rc, f"{name} {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def hidden(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def test_converters_refuse_or_swap_atomically(reference, cache_dir, tmp_path):
    train = tmp_path / "ckpt"
    shutil.copytree(reference[0] / "ckpt", train)
    hf = tmp_path / "hf"
    tool(cache_dir, "convert_to_hf.py", "--load", train, "--out", hf)
    refused = tool(cache_dir, "convert_from_hf.py", "--load", hf, "--save", train, expect_rc=2)
    assert "is not empty (its marker is at iteration 4); pass --force" in refused.stderr
    assert (train / TRACKER).read_text() == "4"
    # A kill in an earlier run left its temporary folder and a renamed-aside old folder.
    (tmp_path / ".hf.abcd1234").mkdir()
    (tmp_path / ".hf.old-99999").mkdir()
    tool(cache_dir, "convert_to_hf.py", "--load", train, "--out", hf, "--force")
    assert (hf / "config.json").is_file() and hidden(tmp_path) == []


def test_preprocess_refuses_overwrite_and_leaves_nothing_on_error(cache_dir, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n{"text": "second document"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    prefix = tmp_path / "out" / "text"
    base = ["preprocess_data.py", "--output-prefix", prefix, "--vocab-size", 300]
    tool(cache_dir, *base, "--input", tmp_path / "a.jsonl")
    files = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert sorted(files) == ["text.bin", "text.idx", "text.meta.json"]  # meta: the tokenizer that made it
    again = tool(cache_dir, *base, "--input", tmp_path / "a.jsonl", expect_rc=2)
    assert "text.bin" in again.stderr and "already exist; pass --force" in again.stderr
    for extra in ([], ["--tokenizer", f"{prefix}_tokenizer"]):  # fails in BPE training / in writing
        bad = tool(cache_dir, *base, "--input", tmp_path / "a.jsonl", tmp_path / "bad.jsonl", "--force",
                   *extra, expect_rc=2)
        assert "bad.jsonl:2: not valid JSON" in bad.stderr
        assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == files
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["text.bin", "text.idx", "text.meta.json", "text_tokenizer"]
    tool(cache_dir, *base, "--input", tmp_path / "a.jsonl", "--force")
