"""SpiralFormer in Megatron-Bridge (docs/BRIDGE.md), on megatron-bridge 0.6.2 + megatron-core 0.19.

One 2-rank launch (bridge_worker.py) runs every Bridge check; the tests here assert on what
it measured, against references: an uninterrupted run for the resume, a DP 2 run for PP 2, the
project's own job build for the weights, the HF model and the converted folder's tensors for
AutoBridge. The folder is made here by the project's converter (tools/convert_to_hf.py's code)
from a job-layout checkpoint of a tiny model with GQA, a gated MLP, chunk offsets and a padded
vocabulary; the Bridge pretrain() checkpoint is converted back here with the same converter.

Skipped where Megatron-Bridge is not installed (CI installs it for its megatron-core 0.19.2
pass only); with SPIRAL_REQUIRE_BRIDGE=1 (that pass) a missing Bridge fails instead.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.hf import helpers

pytestmark = pytest.mark.checkpoint
WORKER = Path(__file__).with_name("bridge_worker.py")


def _bridge_missing() -> str:
    """Why Bridge cannot run here, or ''."""
    import megatron.core

    if importlib.util.find_spec("megatron.bridge") is None:
        return "megatron-bridge is not installed (pip install -e '.[bridge]', docs/BRIDGE.md)"
    if tuple(int(x) for x in megatron.core.__version__.split(".")[:2]) < (0, 19):
        return f"megatron-bridge 0.6.2 needs megatron-core 0.19, this is {megatron.core.__version__}"
    return ""


@pytest.fixture(scope="module")
def hf_folder(megatron, tmp_path_factory):
    """A converted folder of a tiny model, from a checkpoint in the project's job layout."""
    reason = _bridge_missing()
    if reason:
        if os.environ.get("SPIRAL_REQUIRE_BRIDGE") == "1":
            pytest.fail(f"SPIRAL_REQUIRE_BRIDGE=1 but {reason}")
        pytest.skip(reason)
    from spiral_megatron.conversion import convert

    out = tmp_path_factory.mktemp("bridge_hf")
    args = helpers.model_args(**helpers.TP2_CONFIG)
    helpers.save_checkpoint(helpers.build(args), args, out / "job")
    convert.megatron_to_hf_folder(str(out / "job"), str(out / "hf"))
    return out / "hf"


@pytest.fixture(scope="module")
def results(hf_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bridge_run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore",
               SPIRAL_CACHE=str(out / "cache"), HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(out), str(hf_folder)]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"bridge_worker.py exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    report = json.loads((out / "results.json").read_text())
    report["launch_s"], report["out"] = time.time() - started, out
    conv = {tp: (f"logits rel {r['logit_rel_diff']:.2e}", f"tensors {r['tensors']} max diff {r['max_tensor_diff']}")
            for tp, r in report["convert"].items()}
    print(f"\nbridge worker: {report['launch_s']:.0f} s (import {report['import_s']:.0f} s); losses "
          f"{report['train']}; weights vs job {report['weights_tp2_sp']}; AutoBridge {conv}")
    return report


def test_every_job_key_has_its_bridge_field(results):
    """Each job key is mapped to a Bridge field or named as the job's own, and docs/BRIDGE.md's
    table lists every one."""
    import dataclasses

    from spiral_megatron.job.settings.keys import TrainingConfig

    mapped, job_only = results["recipes"]["mapped"], results["recipes"]["job_only"]
    assert sorted(mapped + job_only) == sorted(f.name for f in dataclasses.fields(TrainingConfig))
    doc = (ROOT / "docs" / "BRIDGE.md").read_text()
    assert [k for k in mapped + job_only if f"`{k}`" not in doc] == []


def test_fp16_loss_scaling_and_buckets_reach_megatron_through_bridge(results):
    """The job's fp16 keys as Megatron gets them after Bridge's mixed-precision setup (which
    writes its own defaults over the optimizer's: 2**32, 1, 1000, 2, fp16 gradient reduction)."""
    assert results["recipes"]["fp16_after_setup"] == {
        "fp16": True, "loss_scale": None, "initial_loss_scale": 1024.0, "min_loss_scale": 2.0,
        "loss_scale_window": 50, "hysteresis": 3, "grad_reduce_in_fp32": True, "bucket_size": 4000}


def test_job_only_keys_are_refused(results):
    assert results["recipes"]["refused"] == {
        "log-json": "log_json 'x.jsonl': a key of the project's own job, which Megatron-Bridge has no field for "
                    "(docs/BRIDGE.md); leave it out",
        "valid_seed": "valid_seed 7: a key of the project's own job, which Megatron-Bridge has no field for "
                      "(docs/BRIDGE.md); leave it out"}


def test_recipes_match_the_project_configs(results):
    assert results["recipes"]["differ_from_yaml"] == {f: [] for f in ("debug", "spiral-160m", "spiral-410m",
                                                                      "spiral-1.4b")}
    from spiral_megatron.config import flavors

    assert results["recipes"]["containers"] == list(flavors.names())
    assert results["recipes"]["mock"] == [None, "969,30,1", "NullTokenizer"]  # --mock-data: no data, no tokenizer


def test_sample_based_schedules_are_the_jobs(results):
    """--train-samples, --lr-warmup-samples, --lr-decay-samples (Megatron-LM's sample-based
    training) give Bridge the job's steps and schedule, as iteration keys do; so does WSD's
    annealing (--lr-wsd-decay-iters or -samples, --lr-wsd-decay-style)."""
    got = results["recipes"]["schedules"]
    assert got["samples"] == [[300, 160, 4000, 4808, "cosine", None, "exponential"]] * 2
    assert got["samples_fraction"][0] == got["samples_fraction"][1] == [300, 0.05 * 4808, 4808, 4808, "cosine", None,
                                                                        "exponential"]
    assert got["iters"] == [[30, 48, 400, 480, "cosine", None, "exponential"]] * 2
    assert got["wsd"] == [[30, 48, 480, 480, "WSD", 128, "minus_sqrt"]] * 2
    assert got["wsd_samples"][0] == got["wsd_samples"][1] == [300, 0.0667 * 4808, 4808, 4808, "WSD", 700,
                                                              "exponential"]


def test_pretrain_loss_falls(results):
    losses = results["train"]["uninterrupted"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses


def test_resume_is_exact(results):
    """Bridge's checkpointing: resumed from step 2, steps 3 and 4 lose exactly what the
    uninterrupted run lost (bitwise)."""
    assert results["train"]["resumed"] == results["train"]["uninterrupted"][2:]


@pytest.mark.parametrize("optimizer", ["plain", "distributed"])
def test_fp16_resume_before_the_first_taken_step(results, optimizer):
    """fp16 at Megatron's initial scale 2^32: the checkpoint at step 3 comes before Adam's
    first step (torch's Adam had no state: the distributed optimizer's save asserted, the plain
    one's resume missed the moments). Resumed, the later steps, the first taken ones among them
    (learning rate above 0), repeat the uninterrupted run's bit for bit."""
    run = results["train"]["fp16_early"][optimizer]
    full, resumed = run["uninterrupted"], run["resumed"]
    print(f"\nfp16 {optimizer}: {len(full)} steps logged, resumed {len(resumed)}, "
          f"taken after the resume {sum(lr > 0 for _, lr in resumed)}")
    assert resumed and resumed == full[len(full) - len(resumed):]
    assert any(lr > 0 for _, lr in resumed), "no step after the resume was taken: Adam's first step is not reached"
    assert all(lr == 0 for _, lr in full[:3]), "the first 3 steps were taken: the checkpoint is not before Adam's first step"


def test_pipeline_parallel_matches_data_parallel(results):
    """PP 2 (the core replicated on both stages, its gradients summed by the forward step's
    hook; DDP buckets of 4000 elements, smaller than the core, split alike on both stages by
    the provider) from the same seed: the same 4 losses as DP 2 (the first update has lr 0 in
    warmup, so steps 3 and 4 are the ones a missing gradient sum changes)."""
    torch.testing.assert_close(torch.tensor(results["train"]["pp2"]),
                               torch.tensor(results["train"]["uninterrupted"]), rtol=2e-6, atol=0)


def test_the_example_trains_on_data_of_your_own(results):
    """--data-path brings the data's own tokenizer (300 tokens: not the embedded corpus's 512)
    and a split whose test part is not empty (Megatron-Core loops forever on an empty one: the
    run's own 969,30,1 leaves 0 of 60 documents to test); the data given as a Bridge override
    is refused, naming the flag."""
    e = results["example"]
    assert e["flags"] == ["--data-path", e["prefix"], "--micro-batch-size", "4", "--eval-interval", "null"]
    assert e["blend"] == [[e["prefix"]], None] and e["tokenizer"] == e["prefix"] + "_tokenizer"
    assert e["split"] == "969,31,0", e["split"]
    assert len(e["losses"]) == 2 and all(0 < x < 7 for x in e["losses"]), e["losses"]
    assert e["refused"] == {
        "dataset.blend=[[/elsewhere/text],null]": "dataset.blend: set by the recipe from the job's data flags; give "
        "--data-path instead (the tokenizer beside the data and a split that fits it come with it)",
        "tokenizer.tokenizer_model=/elsewhere": "tokenizer: set by the recipe from the job's data flags; give "
        "--tokenizer-model instead (the tokenizer beside the data and a split that fits it come with it)",
        "train.train_iterz=3": "Could not override 'train.train_iterz'. (Key 'train_iterz' is not in struct)",
        "train.train_iters=abc": "train.train_iters=abc: train.train_iters takes an integer (300 in the recipe)"}


def test_the_example_takes_a_job_config_and_refuses_a_job_file_as_bridge_fields(results):
    """--config is the job's config file (argparse took it for --config-file, and Bridge then
    warned and trained without every key of it); --config-file holds ConfigContainer fields."""
    files = results["example"]["files"]
    # the file's keys over the recipe's (its lr_warmup_iters replaces the recipe's warmup fraction),
    # the command line's over the file's (--micro-batch-size 4 over its 2)
    assert files["job"] == [96, 0.002, 3, 4]
    assert files["bridge"] == [7, 0.004]
    assert files["refused"] == ("--config-file JOB: model.flavor, lr, lr_warmup_iters, micro_batch_size: not a field "
                                "of Bridge's ConfigContainer (a config file of the job's keys goes in --config)")


def test_builder_weights_equal_the_job_build(results):
    assert results["weights_tp2_sp"] == 0.0


@pytest.mark.parametrize("tp", [1, 2])
def test_autobridge_round_trip(results, tp):
    report = results["convert"][f"tp{tp}"]
    assert report["provider"] == "SpiralModelProvider" and report["model"] == "SpiralGPTModel"
    assert report["logit_rel_diff"] <= 1e-5, report
    assert report["missing"] == [] and report["extra"] == [] and report["max_tensor_diff"] == 0.0, report


@pytest.mark.parametrize("tp", [1, 2])
def test_save_hf_pretrained_writes_the_folder(results, tp):
    """The folder Bridge writes from the Megatron model loads with its own model code: the same
    tensors and logits as the converted folder it came from."""
    report = results["convert"][f"tp{tp}"]["saved"]
    assert report["missing"] == [] and report["extra"] == [] and report["max_tensor_diff"] == 0.0, report
    assert report["logit_max_diff"] == 0.0, report


def test_imported_checkpoint_converts_back(results, hf_folder, tmp_path):
    """HF -> AutoBridge.import_ckpt -> a Bridge checkpoint -> the project's converter -> HF:
    every tensor as it was."""
    from safetensors.torch import load_file

    from spiral_megatron.conversion import convert

    convert.megatron_to_hf_folder(str(results["out"] / "imported"), str(tmp_path / "hf"))
    for name in ("model.safetensors", "megatron_vocab_padding.safetensors"):
        got, want = load_file(str(tmp_path / "hf" / name)), load_file(str(hf_folder / name))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_bridge_checkpoint_converts_to_hf(results, tmp_path):
    """A pretrain() checkpoint through tools/convert_to_hf.py's code: the HF model's logits
    are the Megatron model's (rebuilt from the record the builder keeps in run_config.yaml)."""
    from spiral_megatron.conversion import convert

    result = convert.megatron_to_hf_folder(str(results["out"] / "A"), str(tmp_path / "hf"))
    assert result["iteration"] == 4 and result["tokenizer"] is not None
    report = convert.verify(result)
    assert report["max_abs_logit_diff"] <= 1e-5 * report["logit_scale"], report
    assert report["max_abs_cached_diff"] <= 1e-5 * report["logit_scale"], report


def test_shim_keeps_transformer_engine_absent(results):
    assert results["shim"] == {"HAVE_TE": False, "absent_in_sys_modules": []}
