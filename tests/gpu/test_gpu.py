"""The GPU path: precision, backends, FP8, NCCL layouts and resume (issue 7).

Run on a GPU node:  python -m pytest tests/gpu -v -rs   (docs/GPU.md). Every test states its
tolerance; on a CPU host each is skipped with the reason.
"""

import pytest

from tests.gpu.conftest import need, train

# bf16 vs fp32 after 3 steps of the debug model: bf16's 8-bit mantissa, about 3 decimal digits.
BF16_RTOL = 2e-2
# FP8 (e4m3, per-tensor current scaling) vs bf16 on the same steps.
FP8_RTOL = 5e-2
# Layouts on NCCL vs one GPU, fp32: only summation order differs.
LAYOUT_RTOL = 1e-4


def test_bf16_steps_match_fp32(tmp_path):
    need(1)
    fp32 = train(tmp_path, "fp32", "--precision", "fp32")
    bf16 = train(tmp_path, "bf16", "--precision", "bf16")
    assert bf16 == pytest.approx(fp32, rel=BF16_RTOL), f"bf16 {bf16} vs fp32 {fp32}"


def test_transformer_engine_spec_matches_local_spec_in_bf16(tmp_path):
    need(1, te=True)
    local = train(tmp_path, "local", "--precision", "bf16", "--model.transformer_impl", "local")
    te = train(tmp_path, "te", "--precision", "bf16", "--model.transformer_impl", "transformer_engine")
    assert te == pytest.approx(local, rel=BF16_RTOL), f"TE {te} vs local {local}"


def test_three_fp8_tensorwise_steps_are_finite_and_close_to_bf16(tmp_path):
    need(1, te=True)
    bf16 = train(tmp_path, "bf16", "--precision", "bf16")
    fp8 = train(tmp_path, "fp8", "--precision", "bf16", "--fp8", "e4m3", "--fp8-recipe", "tensorwise")
    assert len(fp8) == 3 and all(x == x and abs(x) != float("inf") for x in fp8), fp8
    assert fp8 == pytest.approx(bf16, rel=FP8_RTOL), f"fp8 {fp8} vs bf16 {bf16}"


@pytest.mark.parametrize("layout", [
    ["--tensor-parallel", 2, "--sequence-parallel"],
    ["--pipeline-parallel", 2, "--model.pipeline_split", "3,3"],
], ids=["tp2-sp", "pp2"])
def test_layouts_on_nccl_match_one_gpu_from_the_same_seed(tmp_path, layout):
    need(2)
    one = train(tmp_path, "one", "--precision", "fp32")
    two = train(tmp_path, "two", "--precision", "fp32", *layout, nproc=2)
    assert two == pytest.approx(one, rel=LAYOUT_RTOL), f"{layout}: {two} vs one GPU {one}"


def test_dist_checkpoint_resume_is_bitwise(tmp_path):
    need(1)
    steps = ("--precision", "fp32", "--model.transformer_impl", "local", "--train-iters", 4)
    full = train(tmp_path, "full", *steps)
    save = tmp_path / "ckpt"
    first = train(tmp_path, "first", *steps, "--exit-interval", 2, "--save", save)
    rest = train(tmp_path, "rest", *steps, "--load", save, "--save", save)
    assert first + rest == full, f"2 steps + resume + 2 steps {first + rest} vs 4 steps {full}"
