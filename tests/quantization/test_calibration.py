"""PTQ of the looped model with modelopt (fake quantization, CPU): calibration sees every loop
iteration, per-level scales see only their level, and quantized checkpoints round-trip."""

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

from spiral_megatron.config import flavors  # noqa: E402
from spiral_megatron.model.model_args import ModelArgs  # noqa: E402

pytestmark = [pytest.mark.checkpoint, pytest.mark.both_releases]  # CI runs it on megatron-core 0.16.1 too

SEQ, BATCH, VOCAB = 64, 2, 512


def debug_model():
    from megatron.core import tensor_parallel

    from spiral_megatron.conversion.megatron_io import build_megatron

    tensor_parallel.model_parallel_cuda_manual_seed(7, inference_rng_tracker=True)
    torch.manual_seed(7)
    args = ModelArgs.from_config(flavors.get("debug").config(), vocab_size=VOCAB, max_sequence_length=SEQ)
    return build_megatron(args).eval()


def batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


def forward_loop(model):
    pos = torch.arange(SEQ)[None].expand(BATCH, -1)
    with torch.no_grad():
        for ids in batches():
            model(ids, pos, None)


def record_core_inputs(model):
    """{linear name: [max |input| of each call]} for the core's linears, and the hook handles."""
    seen, handles = {}, []
    for name, module in model.loop.core.named_modules():
        if name.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")):
            seen[name] = []
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen[name].append(args[0].detach().abs().max().item())))
    return seen, handles


def test_core_amax_is_the_max_over_all_loop_iterations(megatron):
    from spiral_megatron.quantization import ptq

    model = debug_model()
    seen, handles = record_core_inputs(model)
    forward_loop(model)  # the same batches calibration will see
    for h in handles:
        h.remove()
    T = len(model.levels)
    model = ptq.quantize(model, "fp8", forward_loop)
    last_differs = 0
    for name, maxima in seen.items():
        assert len(maxima) == T * len(batches())  # one call per iteration per batch
        amax = model.loop.core.get_submodule(name).input_quantizer.amax
        torch.testing.assert_close(amax.float(), torch.tensor(max(maxima)), rtol=0, atol=0)
        last = max(maxima[T - 1::T])  # what the last iteration alone would give
        last_differs += max(maxima) > last
    assert last_differs > 0, "the test needs a core input whose maximum is not at the last level"


def test_per_level_scales_see_only_their_level(megatron):
    from spiral_megatron.quantization import levels, ptq

    model = debug_model()
    seen, handles = record_core_inputs(model)
    forward_loop(model)
    for h in handles:
        h.remove()
    T = len(model.levels)
    model = ptq.quantize(model, "fp8", forward_loop, per_level=True)
    distinct = 0
    for name, maxima in seen.items():
        q = model.loop.core.get_submodule(name).input_quantizer
        assert isinstance(q, levels.LevelQuantizer) and len(q.levels) == T
        per_level = [max(maxima[t::T]) for t in range(T)]
        for t in range(T):
            torch.testing.assert_close(q.levels[t].amax.float(), torch.tensor(per_level[t]), rtol=0, atol=0)
        distinct += len(set(per_level)) > 1
    assert distinct > 0
    # Outside the core nothing is split.
    assert not levels.has_levels(model.prelude) and not levels.has_levels(model.coda)


def test_per_level_changes_the_output_and_is_refused_for_weight_only(megatron):
    from spiral_megatron.quantization import ptq

    pos = torch.arange(SEQ)[None].expand(BATCH, -1)
    ids = batches()[0]
    with torch.no_grad():
        shared = ptq.quantize(debug_model(), "int8_sq", forward_loop)(ids, pos, None)
        split = ptq.quantize(debug_model(), "int8_sq", forward_loop, per_level=True)(ids, pos, None)
    assert not torch.equal(shared, split)
    with pytest.raises(ValueError, match="weights only"):
        ptq.quantize(debug_model(), "int4_awq", forward_loop, per_level=True)
    with pytest.raises(ValueError, match="unknown quantization format 'int3'"):
        ptq.quantize(debug_model(), "int3", forward_loop)


@pytest.mark.parametrize("fmt,per_level", [("fp8", True), ("int8_sq", True), ("int4_awq", False)])
def test_quantized_checkpoint_round_trip(megatron, tmp_path, fmt, per_level):
    """Megatron dist checkpoint + modelopt state (Megatron-LM's layout); a fresh model restored
    from it gives bitwise the quantized model's logits."""
    from megatron.core import dist_checkpointing

    from spiral_megatron.quantization import checkpoint, ptq

    pos = torch.arange(SEQ)[None].expand(BATCH, -1)
    ids = batches()[0]
    model = ptq.quantize(debug_model(), fmt, forward_loop, per_level=per_level)
    with torch.no_grad():
        expected = model(ids, pos, None)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp_path))
    checkpoint.save_state(model, tmp_path, model.spiral_quant_recipe)
    assert (tmp_path / checkpoint.STATE_DIR).is_dir() and (tmp_path / checkpoint.RECIPE_FILE).is_file()

    fresh = debug_model()
    with torch.no_grad():
        for p in fresh.parameters():  # nothing may survive from the build
            p.normal_()
    recipe = checkpoint.restore_state(fresh, tmp_path)
    assert recipe == ptq.QuantRecipe(fmt, per_level)
    state = dist_checkpointing.load({"model": fresh.sharded_state_dict()}, str(tmp_path))
    fresh.load_state_dict(state["model"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, pos, None), expected, rtol=0, atol=0)
