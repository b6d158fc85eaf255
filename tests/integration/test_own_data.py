"""A new user's own small corpus: preprocess it, train on it with default settings.

Megatron's dataset builder loops forever on a split holding no tokens; the default split
969,30,1 leaves a corpus of fewer than 500 documents no test documents and a few-document one
no validation documents. These runs would hang without dataset_check.py.
"""

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT, TINY, environment, launch

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint

# Five documents of our own, about 250 to 900 tokens each with a 300-token BPE.
DOCS = [
    "Sourdough needs flour, water, salt and patience. " * 12,
    "The tide tables for the harbour list high and low water twice a day. " * 10,
    "A bicycle chain wears out; measure its stretch with a ruler every season. " * 9,
    "Moths navigate by the moon and are confused by street lights. " * 8,
    "Write the test first, watch it fail, then make it pass. " * 7,
]


@pytest.fixture(scope="module")
def own_data(tmp_path_factory, cache_dir):
    """data/mine.bin/.idx and data/mine_tokenizer, made by the preprocess tool as README shows."""
    root = tmp_path_factory.mktemp("own")
    (root / "mine.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", root / "mine.jsonl",
           "--output-prefix", root / "data" / "mine", "--vocab-size", 300]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=environment(cache_dir))
    assert proc.returncode == 0, proc.stderr
    return root / "data" / "mine"


def test_a_few_documents_train_with_default_settings(own_data, cache_dir, tmp_path):
    proc = launch(cache_dir, "--data-path", own_data, *TINY, "--save", tmp_path / "ckpt", timeout=240)
    assert f"tokenizer: {own_data}_tokenizer (written beside" in proc.stdout
    assert "tokenizer_vocab_size: 300" in (tmp_path / "ckpt" / "config.yaml").read_text()  # the real vocabulary
    assert "vocabulary 300 (padded to 384)" in proc.stdout
    assert "split: the default 969,30,1 leaves a split without one sample of 129 tokens" in proc.stdout
    assert "using 4,1,0 (train,valid,test)" in proc.stdout
    assert "val loss" in proc.stdout and "finished iteration 4" in proc.stdout


def test_an_explicit_split_that_leaves_validation_empty_is_refused(own_data, cache_dir, tmp_path):
    proc = launch(cache_dir, "--data-path", own_data, "--split", "969,30,1", *TINY,
                  "--save", tmp_path / "ckpt", expect_rc=2, timeout=120)
    assert (f"split '969,30,1' leaves the valid split of '{own_data}' 0 of its 5 documents (0 tokens), "
            "fewer than one sample of 129 tokens; --split 4,1,0 would work") in proc.stderr
    assert "pipeline partition" not in proc.stdout  # refused before the model is built


def test_separate_validation_data(own_data, cache_dir, tmp_path):
    proc = launch(cache_dir, "--train-data-path", own_data, "--valid-data-path", own_data, *TINY,
                  "--save", tmp_path / "ckpt", timeout=240)
    assert "val loss" in proc.stdout and "finished iteration 4" in proc.stdout
    assert f"data: train {own_data}; valid {own_data}, vocabulary" in proc.stdout  # both named


def test_data_of_another_tokenizer_is_refused_by_name(own_data, cache_dir, tmp_path):
    """Data made with another BPE of the same size would train silently on ids that mean other text."""
    (tmp_path / "more.jsonl").write_text("".join(json.dumps({"text": d[::-1]}) + "\n" for d in DOCS))
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", tmp_path / "more.jsonl",
           "--output-prefix", tmp_path / "more", "--vocab-size", 300]
    assert subprocess.run(list(map(str, cmd)), capture_output=True, env=environment(cache_dir)).returncode == 0
    proc = launch(cache_dir, "--data-path", tmp_path / "more", "--tokenizer-model", f"{own_data}_tokenizer", *TINY,
                  "--save", tmp_path / "ckpt", expect_rc=2, timeout=120)
    assert (f"data_path '{tmp_path / 'more'}' was made with the tokenizer '{tmp_path / 'more'}_tokenizer' (300 tokens"
            in proc.stderr)
    assert f"not this run's '{own_data}_tokenizer' (300 tokens" in proc.stderr
    assert f"pass --tokenizer-model {tmp_path / 'more'}_tokenizer" in proc.stderr
    assert "pipeline partition" not in proc.stdout  # refused before the model is built
