"""The job in bf16 and fp16 on CPU (2 processes, gloo): the debug flavor for 6 steps, its loss
falling as fp32's does from the same seed, and a resume from the step-3 checkpoint giving the
uninterrupted run's steps bit for bit.

bf16 runs Megatron's distributed optimizer, fp16 its mixed-precision optimizer with the
dynamic grad scaler (Megatron-LM's loss-scale flags), so both of Megatron's optimizers for
16-bit parameters run with fp32 main weights and gradients. The fp16 scaler starts low and
grows every 2 steps until the scaled gradients overflow (a skipped step, the scale halved): the
resumed run must restore that state to repeat the steps exactly. With Megatron's own initial
scale (2^32) the first 14 steps overflow, before torch's Adam has any state: a checkpoint from
then must resume too, with and without the distributed optimizer.
"""

import pytest

from spiral_megatron.config import flavors
from tests.formats import loss_change_failures, tolerance
from tests.integration.conftest import checkpoint_at, launch, logged

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint

BASE = ("--micro-batch-size", 2, "--global-batch-size", 4, "--lr-warmup-iters", 1,
        "--log-interval", 1, "--eval-interval", "null", "--save-interval", 3)
STEPS = (*BASE, "--train-iters", 6)
INITIAL_SCALE = 2.0 ** 17
FORMATS = {
    "bf16": ("--bf16", "--use-distributed-optimizer", "true"),
    "fp16": ("--fp16", "--initial-loss-scale", INITIAL_SCALE, "--loss-scale-window", 2, "--hysteresis", 1,
             "--min-loss-scale", 1),
}
# Megatron's default loss scale: steps 1-14 overflow, 15-18 include the first taken ones
EARLY = {"fp16 from 2^32": ("--fp16",), "fp16 from 2^32, distributed optimizer": ("--fp16", "--use-distributed-optimizer", "true")}
RUNS = {**{fmt: (*STEPS, *flags) for fmt, flags in FORMATS.items()},
        **{name: (*BASE, "--train-iters", 18, *flags) for name, flags in EARLY.items()}}
_DEBUG = flavors.get("debug").model
DEPTH = _DEBUG["num_prelude_layers"] + _DEBUG["num_core_layers"] * len(_DEBUG["chunk_sizes"]) + _DEBUG["num_coda_layers"]


@pytest.fixture(scope="module")
def fp32(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    launch(cache_dir, *STEPS, "--save", "null", "--log-json", out / "log.jsonl", nproc=2)
    return logged(out / "log.jsonl")


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory):
    """name in RUNS -> (the uninterrupted run's log, the log of the run resumed from its step 3)."""
    done = {}

    def get(fmt):
        if fmt not in done:
            out = tmp_path_factory.mktemp(fmt.replace(" ", "_").replace(",", ""))
            args = RUNS[fmt]
            launch(cache_dir, *args, "--save", out / "full", "--log-json", out / "full.jsonl", nproc=2)
            resumed = checkpoint_at(out / "full", 3, out / "resumed")
            proc = launch(cache_dir, *args, "--load", resumed, "--save", resumed, "--log-json",
                          out / "resumed.jsonl", nproc=2)
            assert "resumed from" in proc.stdout and "at iteration 3" in proc.stdout
            done[fmt] = logged(out / "full.jsonl"), logged(out / "resumed.jsonl")
        return done[fmt]
    return get


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_loss_falls_as_in_fp32(fp32, runs, fmt):
    """Each step's loss, and the loss change over the 6 steps, equal fp32's within the gradient
    tolerance of the format (tests/formats.py: the updates carry the gradients' rounding). fp16's
    one skipped step is the last (its loss is computed before the update it skips)."""
    full, _ = runs(fmt)
    ref, got = [fp32[i]["loss"] for i in sorted(fp32)], [full[i]["loss"] for i in sorted(full)]
    tol = tolerance(("fp32", fmt), DEPTH, passes=2)
    worst = max(abs(a - b) / b for a, b in zip(got, ref))
    print(f"\n{fmt}: losses {[round(x, 5) for x in got]} vs fp32 {[round(x, 5) for x in ref]}; largest relative "
          f"difference {worst:.2e}; loss change {got[0] - got[-1]:.5f} vs {ref[0] - ref[-1]:.5f} (tolerance {tol:.3f})")
    failures = loss_change_failures(ref, got, tol)
    failures += [f"step {i + 1}: loss {b} vs fp32 {a}" for i, (a, b) in enumerate(zip(ref, got)) if not abs(b - a) <= tol * a]
    assert not failures, failures


@pytest.mark.both_releases
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_resume_repeats_the_uninterrupted_steps_exactly(runs, fmt):
    full, resumed = runs(fmt)
    assert sorted(resumed) == [4, 5, 6]
    _assert_same_steps(full, resumed, fp16=fmt == "fp16")


@pytest.mark.both_releases
@pytest.mark.parametrize("name", list(EARLY))
def test_fp16_resume_before_the_first_taken_step(runs, name):
    """The step-3 checkpoint is saved before Adam's first step (steps 1-3 overflow at Megatron's
    initial scale). It saved (the distributed optimizer asserted one step count over no state)
    and it resumes (the load expected Adam's moments and a step count): steps 4-18, the first
    taken ones among them, repeat the uninterrupted run's bit for bit."""
    full, resumed = runs(name)
    assert sorted(resumed) == list(range(4, 19))
    assert all(full[i]["skipped_iterations"] for i in (1, 2, 3))
    taken = [i for i in sorted(resumed) if full[i]["grad_norm"] is not None]
    print(f"\n{name}: first taken steps {taken}; loss scale at step 18 {full[18]['loss_scale']}")
    assert taken, "no step after the resume was taken: the test does not reach Adam's first step"
    _assert_same_steps(full, resumed, fp16=True)


def _assert_same_steps(full: dict, resumed: dict, fp16: bool) -> None:
    keys = ("loss", "lr", "grad_norm") + (("loss_scale", "skipped_iterations") if fp16 else ())
    for it, record in resumed.items():
        for key in keys:
            assert record[key] == full[it][key], (it, key)


@pytest.mark.both_releases
def test_fp16_dynamic_loss_scaling_grows_and_backs_off(runs):
    """The flags reach Megatron's scaler: it starts at --initial-loss-scale, doubles after
    --loss-scale-window good steps, and an overflow skips the step and halves it (--hysteresis 1)."""
    full, _ = runs("fp16")
    scales = [full[i]["loss_scale"] for i in sorted(full)]
    skipped = [i for i in sorted(full) if full[i]["skipped_iterations"]]
    print(f"\nfp16 loss scale after each step: {scales}; skipped steps {skipped}")
    assert scales[0] == INITIAL_SCALE and max(scales) > INITIAL_SCALE
    assert skipped and all(full[i]["loss_scale"] == full[i - 1]["loss_scale"] / 2 for i in skipped)
    assert all(full[i]["grad_norm"] is None for i in skipped)
