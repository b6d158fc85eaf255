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


@pytest.mark.parametrize("layout,script,extra", [
    ("TP2", "tp2_save.py", []),  # GQA + gated MLP sharded over two ranks
    ("PP2", "pp2_save.py", []),  # two pipeline stages, the loop split between them, MeSH state crossing
    ("PP2-prelude-apart", "pp2_save.py", ["1,4"]),  # the raw embeddings travel to the loop's stage
])
def test_checkpoint_of_another_layout_converts_to_the_same_logits(megatron, tmp_path, layout, script, extra):
    from spiral_megatron.conversion.convert import load_hf

    save = tmp_path / layout
    torchrun(ROOT / "tests/hf" / script, 2, save, *extra)
    out = tmp_path / "hf"
    assert convert_to_hf.main(["--load", str(save), "--out", str(out), "--verify"]) == 0
    ref = torch.load(save / f"{script.split('_')[0]}_logits.pt")
    with torch.no_grad():
        got = load_hf(out)(ref["ids"], use_cache=False).logits
    diff = (got - ref["logits"][..., : H.VOCAB]).abs().max().item()
    print(f"\n{layout} checkpoint: max |megatron({layout}) - hf| = {diff:.2e}")
    assert ref["logits"].abs().max() > 0.5
    torch.testing.assert_close(got, ref["logits"][..., : H.VOCAB], rtol=0, atol=2e-5)
