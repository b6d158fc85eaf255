"""tools/quantize.py calibrates on validation samples [0, N) and evaluates on [N, N + E): on
validation data of fewer than N + E samples Megatron's dataset repeats samples (a second,
reshuffled epoch), and the evaluation would score samples the calibration saw. The tool
refuses, naming how many the data holds (counted here from the tokens written)."""

import json

import numpy
import pytest
import yaml

from spiral_megatron.errors import ConfigError
from spiral_megatron.job.data.preprocess import preprocess, read_indexed_dataset
from spiral_megatron.quantization import run

SEQ = 16


@pytest.fixture(scope="module", params=["valid-data-path", "split"])
def folder(request, tmp_path_factory):
    """A checkpoint folder's config.yaml whose validation data is a small corpus used whole, or
    the validation part (the last 24 of 104 documents) of --data-path with --split 80,24,0."""
    root = tmp_path_factory.mktemp("valid")
    for name, n in (("train", 80), ("valid", 24)):
        docs = root / f"{name}.jsonl"
        docs.write_text("\n".join(json.dumps({"text": f"{name} {i}: " + "word " * (3 + i % 5)}) for i in range(n)) + "\n")
    preprocess([str(root / "train.jsonl"), str(root / "valid.jsonl")], str(root / "all"), vocab_size=300)
    preprocess([str(root / "valid.jsonl")], str(root / "valid"), tokenizer=str(root / "all_tokenizer"))
    data = ({"train_data_path": [str(root / "all")], "valid_data_path": [str(root / "valid")]}
            if request.param == "valid-data-path" else {"data_path": [str(root / "all")], "split": "80,24,0"})
    (root / "config.yaml").write_text(yaml.safe_dump({
        "model": {"flavor": "debug"}, "seq_length": SEQ, "train_iters": 2, **data,
        "tokenizer": str(root / "all_tokenizer"), "cache_dir": str(root / "cache")}))
    return root


def distinct_samples(folder):
    """Samples of SEQ tokens (plus the label shift's one) in one pass over the validation
    documents: those of valid.jsonl in either layout."""
    tokens = sum(len(doc) for doc in read_indexed_dataset(str(folder / "valid")))
    return (tokens - 1) // SEQ


def test_calibration_and_evaluation_never_share_a_sample(folder):
    fits = distinct_samples(folder)
    assert 12 < fits < 40
    batches = run.validation_batches(folder, fits, micro_batch=4)
    rows = numpy.concatenate([b["tokens"].numpy() for b in batches])  # [fits, SEQ]
    assert rows.shape == (fits, SEQ)
    assert len({r.tobytes() for r in rows}) == fits, "each sample once"
    with pytest.raises(ConfigError, match=rf"{fits + 1} validation samples of {SEQ} tokens would repeat samples: "
                                          rf"the validation data of .*(valid|all \(split 80,24,0\)) holds {fits}$"):
        run.validation_batches(folder, fits + 1, micro_batch=4)
