"""The tokenizer's digest (job/data/tokenizer.py) names what maps ids to text: the same tokenizer
saved again by transformers, with the truncation of the session that saved it and
transformers' post-processor, is the same tokenizer to the data check and the resume check;
another vocabulary is not; data recorded with the digest of before still passes."""

import json

import pytest

from spiral_megatron.job.data import dataset_check
from spiral_megatron.job.data.preprocess import meta_path
from spiral_megatron.job.data.tokenizer import Tokenizer

TEXTS = ["def main():\n    return 1\n", "import asyncio\nasync def run(): await asyncio.sleep(1)\n"] * 20


def test_a_tokenizer_saved_again_by_transformers_keeps_its_digest(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.train_bpe(TEXTS, 300)
    ours.save(tmp_path / "ours")
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "ours"))
    fast.pad_token = fast.eos_token
    fast(TEXTS[:2], truncation=True, max_length=8, padding="max_length")  # a fine-tuning session's settings
    fast.save_pretrained(str(tmp_path / "again"))
    saved = json.loads((tmp_path / "again" / "tokenizer.json").read_text())
    assert saved["truncation"] is not None or saved["post_processor"] is not None  # the file did change
    again = Tokenizer.load(tmp_path / "again")
    assert again.unique_identifiers == Tokenizer.load(tmp_path / "ours").unique_identifiers
    assert again.encode(TEXTS[1] * 5) == ours.encode(TEXTS[1] * 5)  # no truncation applies to documents
    other = Tokenizer.train_bpe(TEXTS[:1], 300)
    assert other.unique_identifiers["sha256"] != ours.unique_identifiers["sha256"]


def test_data_recorded_with_the_earlier_digest_still_passes(tmp_path):
    tok = Tokenizer.train_bpe(TEXTS, 300)
    digest, legacy = tok.digests
    prefix = str(tmp_path / "data")
    for recorded in (digest, legacy):
        meta_path(prefix).write_text(json.dumps({"tokenizer": "t", "tokenizer_sha256": recorded}))
        dataset_check.check_tokenizer(prefix, tok)
    meta_path(prefix).write_text(json.dumps({"tokenizer": "t", "tokenizer_sha256": "0" * 16}))
    with pytest.raises(Exception, match="was made with the tokenizer 't'"):
        dataset_check.check_tokenizer(prefix, tok)
