"""A model-only checkpoint (what tools/convert_from_hf.py writes) loads: weights only,
optimizer and LR schedule fresh. Made here by converting a training checkpoint to Hugging
Face and back with the tools, as a user would. In bf16 the optimizer's fp32 main copies must
be taken from the loaded weights, not the initial ones (before, the first step put the initial
weights back: the loss went to ln(vocabulary) and stayed)."""

import subprocess
import sys

import pytest
import torch

from tests.integration.conftest import ROOT, TINY, environment, launch, logged

pytestmark = [pytest.mark.checkpoint, pytest.mark.both_releases]  # CI runs it on megatron-core 0.16.1 too


def tool(cache_dir, name, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=dict(environment(cache_dir), HF_HUB_OFFLINE="1"), cwd=ROOT)
    assert proc.returncode == 0, f"{name} {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def converted(reference, cache_dir, tmp_path_factory):
    """The reference's last checkpoint to Hugging Face and back: a model-only checkpoint."""
    folder = tmp_path_factory.mktemp("converted")
    tool(cache_dir, "convert_to_hf.py", "--load", reference[0] / "ckpt", "--out", folder / "hf")
    tool(cache_dir, "convert_from_hf.py", "--load", folder / "hf", "--save", folder / "from_hf")
    return folder / "from_hf"


@pytest.mark.parametrize("precision", [(), ("--bf16",), ("--bf16", "--use-distributed-optimizer")],
                         ids=["fp32", "bf16", "bf16-distributed-optimizer"])
def test_converted_hf_checkpoint_loads_weights_and_trains(reference, converted, cache_dir, tmp_path, precision):
    full = reference[1]
    proc = launch(cache_dir, *TINY, "--train-iters", 2, "--eval-interval", 1, "--load", converted,
                  "--save", tmp_path / "ckpt", "--log-json", tmp_path / "log.jsonl", *precision)
    assert "loaded model weights only from" in proc.stdout and "start fresh" in proc.stdout
    log = logged(tmp_path / "log.jsonl")
    assert sorted(log) == [1, 2] and all(r["loss"] < 6.2 for r in log.values())  # trained, not ln(512)
    # Warmup starts at lr 0, so step 1 leaves the weights as loaded: the validation loss is
    # the reference's after its last step (same weights, same validation batches; bf16 rounds).
    assert log[1]["val_loss"] == pytest.approx(full[4]["val_loss"], abs=0.02 if precision else 1e-5)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    # converted back to Hugging Face, by default in the format it trained in (its stored weights')
    from spiral_megatron.conversion import convert, hf_io

    result = convert.megatron_to_hf_folder(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    _, state, _ = hf_io.read_hf_folder(tmp_path / "hf")
    want = torch.bfloat16 if precision else torch.float32
    assert result["dtype"] == want and {v.dtype for v in state.values()} == {want}


def test_finetune_starts_from_the_weights_at_iteration_0_then_resumes_its_own(reference, cache_dir, tmp_path):
    """--finetune (Megatron-LM's) from a full checkpoint: its weights at iteration 0, the rest
    fresh; the same command, requeued, resumes the fine-tuning run's own checkpoint in --save."""
    full = reference[1]
    args = (*TINY, "--train-iters", 2, "--exit-interval", 1, "--eval-interval", 1, "--finetune",
            "--load", reference[0] / "ckpt", "--save", tmp_path / "ft", "--log-json", tmp_path / "log.jsonl")
    first = launch(cache_dir, *args)
    assert "starts at iteration 0 with a fresh optimizer" in first.stdout
    # Warmup starts at lr 0: step 1 leaves the weights as loaded, the reference's after step 4.
    assert logged(tmp_path / "log.jsonl")[1]["val_loss"] == pytest.approx(full[4]["val_loss"], abs=1e-5)
    second = launch(cache_dir, *args)
    assert "holds this fine-tuning run's checkpoint: resuming it" in second.stdout
    assert "at iteration 1 (4 samples consumed)" in second.stdout and "finished iteration 2" in second.stdout
    refused = launch(cache_dir, *TINY, "--finetune", "--load", tmp_path / "ft", "--save", tmp_path / "ft", expect_rc=2)
    assert "fine-tuning starts from another run's checkpoint (--load) and saves its own in --save" in refused.stderr
