"""Per-level activation scales under recompute (issue 14 section 4, issue 21 item 7): whatever
replays core modules in the backward (`recompute_loop_iterations`, Megatron's selective
`recompute_modules` or its full recompute) replays them at their own level, so the gradients
equal those of no recompute, parameter by parameter."""

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

from spiral_megatron.config import flavors  # noqa: E402
from spiral_megatron.model.model_args import ModelArgs  # noqa: E402
from tests.quantization.test_calibration import BATCH, SEQ, VOCAB, batches, forward_loop  # noqa: E402

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint

RECOMPUTE = {
    "loop-iterations": dict(recompute_loop_iterations=True),
    # "mlp" replays the quantized fc1/fc2 (it needs add_bias_linear false, and "layernorm"
    # Transformer Engine: SpiralConfig._check_recompute)
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def quantized_model(**runtime):
    """The debug flavor without linear biases, fp8 with per-level scales, in training mode."""
    from megatron.core import tensor_parallel

    from spiral_megatron.conversion.megatron_io import build_megatron
    from spiral_megatron.quantization import ptq

    tensor_parallel.model_parallel_cuda_manual_seed(7, inference_rng_tracker=True)
    torch.manual_seed(7)
    config = flavors.get("debug").config(add_bias_linear=False)
    args = ModelArgs.from_config(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    model = build_megatron(args, **runtime).eval()
    return ptq.quantize(model, "fp8", forward_loop, per_level=True).train()


def gradients(model) -> dict:
    model.zero_grad(set_to_none=True)
    ids = batches(1)[0]
    pos = torch.arange(SEQ)[None].expand(BATCH, -1)
    model(ids, pos, None, labels=ids).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def no_recompute(megatron):
    model = quantized_model()
    return model, gradients(model)


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_recompute_replays_each_level(no_recompute, recompute):
    reference, want = no_recompute
    model = quantized_model(**RECOMPUTE[recompute])
    for name, value in reference.state_dict().items():  # the same weights and calibrated scales
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    got = gradients(model)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_the_levels_matter(no_recompute):
    """Every iteration at the last level's scales gives other gradients: what a recompute that
    replays with the loop's current level would compute."""
    reference, want = no_recompute
    quantizers, reference.loop.level_quantizers = reference.loop.level_quantizers, []
    try:
        for q in quantizers:
            q.level = len(reference.levels) - 1
        wrong = gradients(reference)
    finally:
        reference.loop.level_quantizers = quantizers
    assert any(not torch.allclose(wrong[n], want[n]) for n in want)
