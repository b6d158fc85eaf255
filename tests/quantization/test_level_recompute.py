"""Per-level activation scales under recompute (issue 14, section 4): the loop sets the level
of its core's quantizers itself, so a recomputed iteration (`recompute_loop_iterations`) replays
its own level; Megatron's full recompute of the core is refused before any compute."""

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

from spiral_megatron.config import flavors  # noqa: E402
from spiral_megatron.model.model_args import ModelArgs  # noqa: E402
from tests.quantization.test_calibration import BATCH, SEQ, VOCAB, batches, forward_loop  # noqa: E402

pytestmark = pytest.mark.checkpoint  # CI runs it on both megatron-core releases


def debug_model(**overrides):
    from megatron.core import tensor_parallel

    from spiral_megatron.conversion.megatron_io import build_megatron

    tensor_parallel.model_parallel_cuda_manual_seed(7, inference_rng_tracker=True)
    torch.manual_seed(7)
    args = ModelArgs.from_config(flavors.get("debug").config(**overrides), vocab_size=VOCAB, max_sequence_length=SEQ)
    return build_megatron(args).eval()


def gradients(model) -> dict:
    model.zero_grad(set_to_none=True)
    ids = batches(1)[0]
    pos = torch.arange(SEQ)[None].expand(BATCH, -1)
    model(ids, pos, None, labels=ids).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recompute_loop_iterations_replays_each_level(megatron):
    from spiral_megatron.quantization import ptq

    model = ptq.quantize(debug_model(), "fp8", forward_loop, per_level=True).train()
    want = gradients(model)
    model.config.recompute_loop_iterations = True
    try:
        got = gradients(model)
    finally:
        model.config.recompute_loop_iterations = False
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    # The levels matter: every iteration at the last level's scales gives other gradients.
    quantizers, model.loop.level_quantizers = model.loop.level_quantizers, []
    for q in quantizers:
        q.level = len(model.levels) - 1
    wrong = gradients(model)
    assert any(not torch.allclose(wrong[n], want[n]) for n in want)


def test_full_recompute_of_the_core_is_refused_with_per_level_scales(megatron):
    from spiral_megatron.quantization import levels, ptq

    model = debug_model()
    model.config.recompute_granularity = "full"  # what a training job's config sets
    with pytest.raises(ValueError, match='recompute_granularity "full" cannot run per-level'):
        ptq.quantize(model, "fp8", forward_loop, per_level=True)
    ptq.quantize(model, "fp8", forward_loop)  # shared scales: no level to get wrong
    # A per-level model that a fully recomputing job restores is refused too, before any compute.
    model = ptq.quantize(debug_model(), "fp8", forward_loop, per_level=True)
    model.config.recompute_granularity = "full"
    with pytest.raises(ValueError, match='recompute_granularity "full"'):
        levels.install_levels(model)
