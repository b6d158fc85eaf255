"""Conversion of checkpoints saved at other layouts: TP2 (launched with torchrun), PP2."""

import os
import sys

import pytest
import torch

from tests.conftest import ROOT, torchrun
from tests.hf import helpers as H

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(ROOT / "tools"))
import convert_to_hf  # noqa: E402


def test_tp2_checkpoint_converts_to_the_same_logits(megatron, tmp_path):
    from spiral_megatron.conversion.convert import load_hf

    save = tmp_path / "tp2"
    torchrun(ROOT / "tests/hf/tp2_save.py", 2, save)
    out = tmp_path / "hf"
    assert convert_to_hf.main(["--load", str(save), "--out", str(out), "--verify"]) == 0
    ref = torch.load(save / "tp2_logits.pt")
    with torch.no_grad():
        got = load_hf(out)(ref["ids"], use_cache=False).logits
    diff = (got - ref["logits"][..., : H.VOCAB]).abs().max().item()
    print(f"\nTP2 checkpoint: max |megatron(TP2) - hf| = {diff:.2e}")
    assert ref["logits"].abs().max() > 0.5
    torch.testing.assert_close(got, ref["logits"][..., : H.VOCAB], rtol=0, atol=2e-5)


def test_pp2_checkpoint_converts_to_the_same_logits(megatron, tmp_path):
    """Saved by two pipeline stages (loop split between them): one HF model, same logits."""
    from spiral_megatron.conversion.convert import load_hf

    save = tmp_path / "pp2"
    torchrun(ROOT / "tests/hf/pp2_save.py", 2, save)
    out = tmp_path / "hf"
    assert convert_to_hf.main(["--load", str(save), "--out", str(out), "--verify"]) == 0
    ref = torch.load(save / "pp2_logits.pt")
    with torch.no_grad():
        got = load_hf(out)(ref["ids"], use_cache=False).logits
    diff = (got - ref["logits"][..., : H.VOCAB]).abs().max().item()
    print(f"\nPP2 checkpoint: max |megatron(PP2) - hf| = {diff:.2e}")
    assert ref["logits"].abs().max() > 0.5
    torch.testing.assert_close(got, ref["logits"][..., : H.VOCAB], rtol=0, atol=2e-5)
