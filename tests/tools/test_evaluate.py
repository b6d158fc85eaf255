"""tools/evaluate.py: perplexity from a checkpoint and from its HF folder, on JSONL and on an
indexed dataset, against the HF model's own loss."""

import json
import math
import shutil
import sys

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import evaluate as evaluate_tool  # noqa: E402

from spiral_megatron.analysis import data  # noqa: E402

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint


def test_sequences_are_consecutive_windows():
    docs = [torch.arange(5).numpy(), torch.arange(10, 17).numpy()]
    rows = data.sequences(iter(docs), 3)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 10, 11, 12], [13, 14, 15, 16]]
    assert data.sequences(iter(docs), 3, max_sequences=2).shape == (2, 4)
    with pytest.raises(ValueError, match="fewer than seq_length"):
        data.sequences(iter(docs), 20)


def test_perplexity_from_checkpoint_and_hf_folder(checkpoint, hf_folder, corpus, tmp_path, capsys):
    from spiral_megatron.conversion.convert import load_hf
    from spiral_megatron.job.data.tokenizer import Tokenizer

    common = ["--data", str(corpus), "--seq-length", "20", "--batch-size", "3"]
    assert evaluate_tool.main(["--model", str(checkpoint), "--out", str(tmp_path / "m.json"), *common]) == 0
    assert "sequences" in capsys.readouterr().err  # progress
    assert evaluate_tool.main(["--model", str(hf_folder), "--out", str(tmp_path / "h.json"), *common]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("m.json", "h.json"))
    assert a["loss"] == b["loss"] and a["sequences"] == b["sequences"] == 12 * 41 // 21
    assert a["tokens"] == a["sequences"] * 20 and math.isclose(a["perplexity"], math.exp(a["loss"]))

    # reference: the HF model's own (mean) loss, sequence by sequence
    tok = Tokenizer.load(hf_folder)
    rows = data.sequences(data.token_documents([str(corpus)], tok), 20)
    model = load_hf(hf_folder)
    with torch.no_grad():
        ref = sum(model(r[None], labels=r[None], use_cache=False).loss.item() for r in rows) / len(rows)
    assert math.isclose(a["loss"], ref, rel_tol=1e-5)

    # the same documents as an indexed dataset (documents end with the eod id already)
    from spiral_megatron.job.data.preprocess import read_documents, write_indexed_dataset

    prefix = str(tmp_path / "valid_text_document")
    write_indexed_dataset(read_documents([corpus]), tok, prefix)
    assert evaluate_tool.main(["--model", str(hf_folder), "--data", prefix, "--seq-length", "20",
                               "--out", str(tmp_path / "i.json")]) == 0
    assert json.loads((tmp_path / "i.json").read_text())["loss"] == pytest.approx(a["loss"], rel=1e-6)
    # a folder holding the file, as the file
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / corpus.name).write_bytes(corpus.read_bytes())
    assert evaluate_tool.main(["--model", str(hf_folder), *common[2:], "--data", str(tmp_path / "held"),
                               "--out", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["loss"] == b["loss"]
    # records with their text under another key, named with --json-keys as in preprocess_data.py
    (tmp_path / "content.jsonl").write_text("".join(json.dumps({"content": json.loads(line)["text"], "id": 1}) + "\n"
                                                    for line in corpus.read_text().splitlines() if line.strip()))
    assert evaluate_tool.main(["--model", str(hf_folder), *common[2:], "--data", str(tmp_path / "content.jsonl"),
                               "--json-keys", "content", "--out", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["loss"] == b["loss"]


def test_dtype_scores_the_model_in_it(hf_folder, corpus, tmp_path, capsys):
    """--dtype bf16: the model runs in bfloat16 (the line and the JSON say so), its loss near the
    fp32 one's and not the same; a device this machine lacks is one line naming it."""
    common = ["--model", str(hf_folder), "--data", str(corpus), "--seq-length", "20"]
    assert evaluate_tool.main([*common, "--out", str(tmp_path / "fp32.json")]) == 0
    assert evaluate_tool.main([*common, "--dtype", "bf16", "--device", "cpu", "--out", str(tmp_path / "bf16.json")]) == 0
    assert "bf16 on cpu" in capsys.readouterr().err
    fp32, bf16 = (json.loads((tmp_path / f).read_text()) for f in ("fp32.json", "bf16.json"))
    assert (fp32["dtype"], bf16["dtype"]) == ("fp32", "bf16")
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)
    assert evaluate_tool.main([*common, "--device", "nowhere"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("evaluate: error: --device 'nowhere'")


def test_evaluate_errors(hf_folder, tmp_path, capsys):
    assert evaluate_tool.main(["--model", str(hf_folder), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err

    classifier = tmp_path / "classifier"  # a fine-tuned AutoModelForSequenceClassification's folder
    shutil.copytree(hf_folder, classifier)
    config = json.loads((classifier / "config.json").read_text())
    (classifier / "config.json").write_text(json.dumps({**config, "architectures": ["SpiralForSequenceClassification"]}))
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "some text " * 40}) + "\n")
    assert evaluate_tool.main(["--model", str(classifier), "--data", str(tmp_path / "text.jsonl")]) == 2
    assert "holds a SpiralForSequenceClassification" in capsys.readouterr().err  # not a perplexity of a new lm_head
