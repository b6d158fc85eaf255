"""A tiny trained-shape checkpoint, its HF conversion and a small word-level corpus, shared by
the research-tool tests (probe, evaluate, lm-eval)."""

import json
import os

import pytest

from tests.hf import helpers as H

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def checkpoint(megatron, tmp_path_factory):
    """A TP1 Megatron checkpoint (with the word-level tokenizer of tests/hf/helpers.py)."""
    args = H.model_args(chunk_offsets=[1, 0, 0])
    model = H.build(args, seed=5)
    save = tmp_path_factory.mktemp("research_ckpt")
    H.save_checkpoint(model, args, save)
    return save


@pytest.fixture(scope="session")
def hf_folder(checkpoint, tmp_path_factory):
    """The checkpoint converted with tools/convert_to_hf.py's code."""
    from spiral_megatron.conversion import convert

    out = tmp_path_factory.mktemp("research_hf") / "model"
    convert.megatron_to_hf_folder(str(checkpoint), str(out))
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A JSONL file of 12 documents of 40 words w0..w47 (the helpers tokenizer's words)."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("research_data") / "docs.jsonl"
    docs = [" ".join(f"w{rng.randrange(H.VOCAB - 2)}" for _ in range(40)) for _ in range(12)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path
