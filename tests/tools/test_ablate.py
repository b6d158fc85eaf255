"""tools/ablate.py: the variants and their FLOPs matching, the table, resuming, and one tiny
end-to-end run of two variants through the real training job."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import ablate  # noqa: E402

from spiral_megatron.config import flops  # noqa: E402
from spiral_megatron.analysis import ablation  # noqa: E402


def test_variants_of_debug():
    vs = {v.name: v for v in ablation.variants("debug", 128, 512)}
    assert list(vs) == ["spiral-c2f", "spiral-f2c", "looped", "looped-flops", "gpt", "gpt-flops", "no-overlap",
                        "residual", "anchor", "mesh", "mean-repeat"]
    assert vs["spiral-f2c"].overrides == {"chunk_sizes": (1, 2, 4, 8)}
    assert vs["looped"].overrides == {"chunk_sizes": (1, 1, 1, 1)}
    assert vs["gpt"].overrides["num_prelude_layers"] == 4  # 1 + 2 + 1 unique layers
    # FLOPs matching: 8,4,2,1 costs sum(1/g) = 1.875 core passes -> a loop of T=2 is closest
    assert vs["looped-flops"].overrides == {"chunk_sizes": (1, 1)}
    cost = lambda o: ablation.train_flops_per_sequence("debug", o, 128, 512)  # noqa: E731
    spiral, n = cost({}), vs["gpt-flops"].overrides["num_prelude_layers"]
    for other in (n - 1, n + 1):
        assert abs(cost(ablation._gpt(n)) - spiral) <= abs(cost(ablation._gpt(other)) - spiral)
    # same unique transformer layers: parameters differ only by the loop's own small weights
    base = flops.unique_parameters(ablation.model_config("debug", {}), 512)
    looped = flops.unique_parameters(ablation.model_config("debug", vs["looped"].overrides), 512)
    assert looped < base and flops.unique_parameters(ablation.model_config("debug", vs["gpt"].overrides), 512) < base
    assert ablation.model_arguments("debug", vs["gpt"]) == [
        "--model.flavor=debug", "--model.num_prelude_layers=4", "--model.num_core_layers=0",
        "--model.num_coda_layers=0", "--model.chunk_sizes="]
    with pytest.raises(ValueError, match="unknown variants"):
        ablation.select(list(vs.values()), ["spiral-c2f", "nope"])
    with pytest.raises(ValueError, match="no loop"):
        ablation.variants("gpt-debug", 128, 512)


def _result(variant, lr, seed, loss):
    return dict(variant=variant, lr=lr, seed=seed, val_loss=loss, unique_params=1000, train_flops=2e12,
                tokens=4096, tokens_per_s=100.0 * seed, about="x", chunk_sizes=[8, 4, 2, 1], topology="mesh")


def test_summary_picks_the_best_lr_and_reports_the_spread():
    rows = ablation.summarize([_result("a", 1e-3, 1, 4.0), _result("a", 1e-3, 2, 4.2),
                               _result("a", 3e-3, 1, 3.9), _result("a", 3e-3, 2, 3.95),
                               _result("b", 1e-3, 1, 5.0)])
    assert [r["variant"] for r in rows] == ["a", "b"]
    assert rows[0]["lr"] == 3e-3 and rows[0]["val_loss"] == pytest.approx(3.925)
    assert rows[0]["val_loss_spread"] == pytest.approx(0.025) and rows[0]["seeds"] == [1, 2]
    assert rows[0]["tokens_per_s"] == pytest.approx(150.0) and rows[1]["val_loss_spread"] == 0
    table = ablation.markdown_table(rows)
    assert "| a | x | 8,4,2,1 / mesh | 1,000 | 2T | 4.1k | 3.9250 ± 0.0250 (2) | 150 | 0.003 |" in table


def test_finished_runs_are_not_rerun(tmp_path, monkeypatch):
    args = ablate.parse_args(["--out", str(tmp_path)])
    variant = ablation.Variant("spiral-c2f", {}, "x")
    done = tmp_path / "runs" / "spiral-c2f" / "lr0.003-seed1"
    done.mkdir(parents=True)
    (done / "result.json").write_text(json.dumps(_result("spiral-c2f", 3e-3, 1, 4.0)))

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(subprocess, "run", no_training)
    assert ablate.run_one(args, "debug", variant, 3e-3, 1, None, None, 512)["val_loss"] == 4.0


def test_tiny_ablation_end_to_end(tmp_path):
    """Two variants, one seed, 2 steps each through examples/pretrain_spiral.py; then a rerun
    that trains nothing. (Seconds of training; most of the time is process start-up.) Run from
    a folder of the user's with a relative --out: the training runs see the paths as the user
    gave them (they ran in the repository root: saved elsewhere, found no data)."""
    cmd = [sys.executable, str(ROOT / "tools" / "ablate.py"), "--out", "sweep", "--variants", "spiral-c2f,gpt",
           "--seeds", "1", "--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "2",
           "--seq-length", "32", "--valid-sequences", "4"]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "sweep"
    results = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in results["rows"]] == ["spiral-c2f", "gpt"]
    assert all(r["val_loss"] > 0 and r["tokens"] == 2 * 2 * 32 for r in results["runs"])
    assert results["runs"][1]["chunk_sizes"] == [] and results["runs"][0]["train_flops"] > results["runs"][1]["train_flops"]
    assert "| spiral-c2f |" in (out / "table.md").read_text()
    assert (out / "val_loss_vs_flops.png").stat().st_size > 0
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert second.returncode == 0 and second.stdout.count("not rerun") == 2


def test_own_validation_records_name_their_key(tmp_path, capsys):
    """--valid-data JSONL with its text under another key: --json-keys names it (as in
    tools/preprocess_data.py); without it, one line names the key the records hold."""
    from spiral_megatron.job.data.preprocess import preprocess

    (tmp_path / "train.txt").write_text("alpha beta gamma delta epsilon " * 40)
    preprocess([str(tmp_path / "train.txt")], str(tmp_path / "train"), vocab_size=300)
    (tmp_path / "valid.jsonl").write_text(json.dumps({"content": "alpha beta " * 30}) + "\n")
    common = ["--out", str(tmp_path / "out"), "--train-data", str(tmp_path / "train"), "--valid-data",
              str(tmp_path / "valid.jsonl"), "--tokenizer", str(tmp_path / "train_tokenizer"), "--seq-length", "8",
              "--variants", "gpt", "--seeds", "1"]
    assert ablate.main(common) == 2
    assert capsys.readouterr().err.strip() == (f"ablate: error: --valid-data: {tmp_path / 'valid.jsonl'}:1: no text "
                                               "under key 'text' (the record holds: content; --json-keys KEY names the key)")
    assert ablate.parse_args(common + ["--json-keys", "content"]).text_key == "content"
