"""tools/quantize.py on a checkpoint of the training job, then quantization-aware training:
the job `--load`s the quantized checkpoint, keeps its quantizers, trains on with fake
quantization, and saves a checkpoint that is still quantized. At PP2 (the loop across both
stages, each with its own copy of the core and of its per-level scales) the same QAT steps give
the one-process run's losses and gradient norms."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

from tests.integration.conftest import ROOT, TINY, cache_dir, environment, launch, logged, reference  # noqa: E402,F401

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint

TOOL = ROOT / "tools" / "quantize.py"


def quantize(cache, *args):
    proc = subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=environment(cache), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def restored(folder, megatron_io, checkpoint):
    """The model of checkpoint `folder` as the job restores it: quantizers, then weights."""
    from megatron.core import dist_checkpointing

    model = megatron_io.build_megatron(megatron_io.read_model_args(folder))
    checkpoint.restore_state(model, folder)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(state["model"])
    return model


def amaxes(model):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m.amax.clone() for n, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and m.is_enabled and m.amax is not None}


def test_quantize_tool_then_qat(reference, cache_dir, tmp_path, megatron):  # noqa: F811
    from spiral_megatron.conversion import megatron_io
    from spiral_megatron.quantization import checkpoint, levels

    source = reference[0] / "ckpt"
    quantized, trained = tmp_path / "fp8", tmp_path / "qat"
    proc = quantize(cache_dir, "--load", source, "--formats", "fp8", "--scales", "per-level",
                    "--calib-samples", 8, "--eval-samples", 8, "--micro-batch", 4,
                    "--json", tmp_path / "r.json", "--save", quantized)
    assert "| fp8 | per-level |" in proc.stdout and "calibration batch 2/2" in proc.stderr
    [row] = json.loads((tmp_path / "r.json").read_text())
    assert row["format"] == "fp8" and row["scales"] == "per-level"
    assert row["rel_change"] == pytest.approx((row["val_loss_after"] - row["val_loss_before"]) / row["val_loss_before"])
    folder = quantized / "iter_0000004"
    assert (folder / "modelopt_state").is_dir() and (folder / "quantization.json").is_file()

    # QAT: 4 more steps from the quantized weights (weights only: a fresh optimizer).
    launch(cache_dir, *TINY, "--train-iters", 8, "--load", quantized, "--save", trained,
           "--log-json", tmp_path / "qat.jsonl")
    log = logged(tmp_path / "qat.jsonl")
    assert sorted(log) == [5, 6, 7, 8]
    assert log[8]["loss"] < log[5]["loss"]
    launch(cache_dir, *TINY, "--train-iters", 8, "--load", quantized, "--save", tmp_path / "qat-pp2",
           "--pipeline-model-parallel-size", 2, "--log-json", tmp_path / "qat-pp2.jsonl", nproc=2)
    pp2 = logged(tmp_path / "qat-pp2.jsonl")
    assert sorted(pp2) == [5, 6, 7, 8]
    print("\nQAT losses, PP2 vs one process:", [(pp2[i]["loss"], log[i]["loss"]) for i in sorted(log)])
    for it in pp2:  # the tolerances of tests/distributed/test_layouts.py
        assert pp2[it]["loss"] == pytest.approx(log[it]["loss"], rel=1e-5), (it, pp2[it]["loss"], log[it]["loss"])
        assert pp2[it]["grad_norm"] == pytest.approx(log[it]["grad_norm"], rel=1e-4), it

    before = restored(folder, megatron_io, checkpoint)
    scales_before = amaxes(before)
    assert len(scales_before) > 0
    for run in (trained, tmp_path / "qat-pp2"):
        after = restored(run / "iter_0000008", megatron_io, checkpoint)
        assert levels.has_levels(after), f"{run.name}: the per-level quantizers survive training and saving"
        scales_after = amaxes(after)
        assert scales_before.keys() == scales_after.keys(), run.name
        for name in scales_before:  # QAT trains the weights with the calibrated scales fixed
            torch.testing.assert_close(scales_after[name], scales_before[name], rtol=0, atol=0, msg=f"{run.name}: {name}")
    after = restored(trained / "iter_0000008", megatron_io, checkpoint)
    w = "loop.core.layers.0.mlp.linear_fc1.weight"
    assert not torch.equal(before.state_dict()[w], after.state_dict()[w])

    # The plain converter would drop the quantizers: it refuses and names the export command.
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_to_hf

    assert convert_to_hf.main(["--load", str(trained), "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
