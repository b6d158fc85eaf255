"""A converted folder behaves like any causal-LM repository: its tokenizer is a standard
PreTrainedTokenizerFast (no remote code) that pads on the left with the end-of-document token,
so batched `generate` works as written for any model; every file follows the umask."""

import json
import os

import pytest
import torch

from tests.hf.test_convert import _load, ckpt, hf_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint


def test_tokenizer_is_standard_and_pads_left(hf_dir):  # noqa: F811
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in cfg
    tok = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))  # loading without questions: test_training.py
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "left"


def test_batched_generate_with_the_folders_tokenizer(hf_dir):  # noqa: F811
    from transformers import PreTrainedTokenizerFast

    model, tok = _load(hf_dir), PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    prompts = ["w1 w2 w3 w4 w5 w6", "w7 w8"]
    batch = tok(prompts, return_tensors="pt", padding=True)  # no pad_token_id / padding_side given
    assert batch.attention_mask[1].tolist() == [0] * 4 + [1] * 2  # left padding
    new = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch.input_ids.shape[1]:]
    for row, prompt in zip(new, prompts):
        alone = tok(prompt, return_tensors="pt")
        expected = model.generate(**alone, max_new_tokens=6, do_sample=False)[0, alone.input_ids.shape[1]:]
        assert torch.equal(row[: expected.numel()], expected)  # after an early eos: padding
        assert (row[expected.numel():] == tok.pad_token_id).all()


def test_every_file_follows_the_umask(hf_dir):  # noqa: F811
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in hf_dir.iterdir()}
    assert modes == {name: oct(0o666 & ~mask) for name in modes}, modes  # safetensors writes 0600
