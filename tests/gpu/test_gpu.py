"""The GPU path (issues 7 and 14 section 6a): formats, backends, attention, FP8, NCCL layouts, resume.

Each comparison starts from the same checkpoint: one forward's logits, the gradient norms in
total and per part of the model (a part without gradient fails whatever the tolerance) and
every parameter's gradient (compare.gradient_failures), at
tolerances derived from the formats compared (tests/gpu/compare.py), then the loss change over
20 steps of the job. Run on a GPU node:  python -m pytest tests/gpu -v -rs   (docs/GPU.md).
On a CPU host each test is skipped with the reason; the comparison logic runs on CPU in
tests/unit/test_gpu_compare.py.
"""

import pytest

from spiral_megatron.config import flavors
from tests.formats import loss_change_failures, tolerance
from tests.gpu.compare import forward_failures
from tests.gpu.conftest import forward, need, train

_DEBUG = flavors.get("debug").model
# N_compute of the debug flavor: the layers of the unrolled graph, what each format rounds through.
DEPTH = _DEBUG["num_prelude_layers"] + _DEBUG["num_core_layers"] * len(_DEBUG["chunk_sizes"]) + _DEBUG["num_coda_layers"]
# Layouts on NCCL vs one GPU, fp32: only summation order differs.
LAYOUT_RTOL = 1e-4

LOCAL = ("--model.transformer_impl", "local")
TE = ("--model.transformer_impl", "transformer_engine")
# name -> (job flags, the format its GEMMs round to, the core attention it must have built)
VARIANTS = {
    "fp32": (("--precision", "fp32", *LOCAL, "--attention-backend", "unfused"), "fp32", "DotProductAttention"),
    "bf16": (("--precision", "bf16", *LOCAL, "--attention-backend", "unfused"), "bf16", "DotProductAttention"),
    "bf16-sdpa": (("--precision", "bf16", *LOCAL, "--attention-backend", "flash"), "bf16", "SDPAttention"),
    "bf16-te": (("--precision", "bf16", *TE), "bf16", "TEDotProductAttention"),
    "fp8-te": (("--precision", "bf16", *TE, "--fp8", "e4m3", "--fp8-recipe", "tensorwise"), "e4m3",
               "TEDotProductAttention"),
}
# (run, reference): what each comparison checks against.
PAIRS = [("bf16", "fp32"), ("bf16-sdpa", "bf16"), ("bf16-te", "bf16"), ("fp8-te", "bf16-te")]
NEEDS_TE = {"bf16-te", "fp8-te"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The folder of the shared weights file, written by the fp32 reference's forward."""
    folder = tmp_path_factory.mktemp("forward")
    return folder, folder / "weights.pt", {}


def forward_of(checkpoint, name: str) -> dict:
    folder, weights, done = checkpoint
    if not weights.is_file() and name != "fp32":
        forward_of(checkpoint, "fp32")  # the reference writes the checkpoint
    if name not in done:
        done[name] = forward(folder, name, *VARIANTS[name][0], weights=weights)
        assert done[name]["attention"] == VARIANTS[name][2], f"{name} built {done[name]['attention']}"
    return done[name]


def _ids(pairs):
    return [f"{run}-vs-{ref}" for run, ref in pairs]


@pytest.mark.parametrize("run, ref", PAIRS, ids=_ids(PAIRS))
def test_one_forward_and_gradients_match_from_the_same_checkpoint(checkpoint, run, ref):
    need(1, te=run in NEEDS_TE or ref in NEEDS_TE)
    formats = (VARIANTS[run][1], VARIANTS[ref][1])
    forward_tol, grad_tol = tolerance(formats, DEPTH), tolerance(formats, DEPTH, passes=2)
    a, b = forward_of(checkpoint, ref), forward_of(checkpoint, run)
    print(f"{run} vs {ref}: loss {b['loss']:.6f} vs {a['loss']:.6f}, grad norm {b['grad_norm']:.6g} vs "
          f"{a['grad_norm']:.6g} (tolerances {forward_tol:.3g} / {grad_tol:.3g})")
    failures = forward_failures(a, b, forward_tol, grad_tol)
    assert not failures, f"{run} vs {ref}:\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    need(1)
    return train(tmp_path_factory.mktemp("train"), "fp32", *VARIANTS["fp32"][0])


@pytest.mark.parametrize("run", ["bf16", "bf16-sdpa", "bf16-te", "fp8-te"])
def test_loss_falls_over_20_steps_as_in_fp32(tmp_path, reference_losses, run):
    need(1, te=run in NEEDS_TE)
    losses = train(tmp_path, run, *VARIANTS[run][0])
    tol = tolerance(("fp32", VARIANTS[run][1]), DEPTH, passes=2)
    print(f"{run}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; fp32 {reference_losses[0]:.4f} -> {reference_losses[-1]:.4f}")
    failures = loss_change_failures(reference_losses, losses, tol)
    assert not failures, f"{run} vs fp32:\n" + "\n".join(failures)


@pytest.mark.parametrize("layout", [
    ["--tensor-parallel", 2, "--sequence-parallel"],
    ["--pipeline-parallel", 2, "--model.pipeline_split", "3,3"],
], ids=["tp2-sp", "pp2"])
def test_layouts_on_nccl_match_one_gpu_from_the_same_seed(tmp_path, layout):
    need(2)
    one = train(tmp_path, "one", "--precision", "fp32")
    two = train(tmp_path, "two", "--precision", "fp32", *layout, nproc=2)
    assert two == pytest.approx(one, rel=LAYOUT_RTOL), f"{layout}: {two} vs one GPU {one}"


@pytest.mark.parametrize("spec", [LOCAL, TE], ids=["local", "transformer_engine"])
def test_dist_checkpoint_resume_is_bitwise(tmp_path, spec):
    need(1, te=spec == TE)
    steps = ("--precision", "fp32", *spec, "--train-iters", 4)
    env = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}  # TE's attention backward may otherwise use atomics
    full = train(tmp_path, "full", *steps, **env)
    save = tmp_path / "ckpt"
    first = train(tmp_path, "first", *steps, "--exit-interval", 2, "--save", save, **env)
    rest = train(tmp_path, "rest", *steps, "--load", save, "--save", save, **env)
    assert first + rest == full, f"2 steps + resume + 2 steps {first + rest} vs 4 steps {full}"
