"""Conversion of checkpoints saved at other layouts: TP2 and PP2 (one torchrun launch saves all)."""

import os
import sys

import pytest
import torch

from tests.conftest import ROOT, torchrun
from tests.hf import helpers as H

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(ROOT / "tools"))
import convert_to_hf  # noqa: E402

pytestmark = pytest.mark.checkpoint
LAYOUTS = {
    "TP2": "tp2",  # GQA + gated MLP sharded over two ranks
    "PP2": "pp2",  # two pipeline stages, the loop split between them, MeSH state crossing
    "PP2-prelude-apart": "pp2",  # the raw embeddings travel to the loop's stage
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    torchrun(ROOT / "tests/hf/layouts_save.py", 2, root)
    return root


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpoint_of_another_layout_converts_to_the_same_logits(megatron, saved, tmp_path, layout):
    from spiral_megatron.conversion.convert import load_hf

    save = saved / layout
    out = tmp_path / "hf"
    assert convert_to_hf.main(["--load", str(save), "--out", str(out), "--verify"]) == 0
    ref = torch.load(save / f"{LAYOUTS[layout]}_logits.pt")
    with torch.no_grad():
        got = load_hf(out)(ref["ids"], use_cache=False).logits
    diff = (got - ref["logits"][..., : H.VOCAB]).abs().max().item()
    print(f"\n{layout} checkpoint: max |megatron({layout}) - hf| = {diff:.2e}")
    assert ref["logits"].abs().max() > 0.5
    torch.testing.assert_close(got, ref["logits"][..., : H.VOCAB], rtol=0, atol=2e-5)
