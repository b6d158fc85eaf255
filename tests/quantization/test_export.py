"""Export of a quantized checkpoint to Hugging Face: the HF model with modelopt's activation
quantizers gives the fake-quantized Megatron model's logits, cached decoding included."""

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("transformers")

from tests.quantization.test_calibration import SEQ, debug_model, forward_loop  # noqa: E402

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint


def quantized_checkpoint(root, fmt, per_level=False):
    """A checkpoint folder (job layout, model only) of the debug model quantized with `fmt`."""
    from megatron.core import dist_checkpointing

    from spiral_megatron.model.model_args import ModelArgs
    from spiral_megatron.quantization import checkpoint, ptq

    model = ptq.quantize(debug_model(), fmt, forward_loop, per_level=per_level)
    folder = root / "iter_0000001"
    folder.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(folder))
    checkpoint.save_state(model, folder, model.spiral_quant_recipe)
    ModelArgs.from_config(model.config, vocab_size=model.vocab_size, max_sequence_length=SEQ).save(
        folder / "model_args.json")
    (root / "latest_checkpointed_iteration.txt").write_text("1")
    return root


@pytest.mark.parametrize("fmt,plain_matches", [("int8_sq", False), ("int4_awq", True)])
def test_exported_hf_model_gives_the_quantized_logits(megatron, tmp_path, fmt, plain_matches):
    from spiral_megatron.conversion.convert import cached_logits, load_hf
    from spiral_megatron.quantization import export

    result = export.export_hf(quantized_checkpoint(tmp_path / "ckpt", fmt), tmp_path / "hf")
    ids = torch.randint(0, result["config"].vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref = result["megatron"](ids, pos, None)[..., : result["config"].vocab_size]  # fake-quant Megatron
        model = export.load_quantized_hf(tmp_path / "hf")
        full = model(ids, use_cache=False).logits
        cached = cached_logits(model, ids)
        plain = load_hf(tmp_path / "hf")(ids, use_cache=False).logits
    torch.testing.assert_close(full, ref, rtol=0, atol=1e-4)
    # Cached decoding computes the same values in another order: an activation that lands within
    # float rounding of a quantization boundary can round to the neighbouring step (measured
    # up to 3e-3 on these logits for int8, exact to 1e-5 without activation quantization).
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-2)
    # int8 SmoothQuant needs the activation quantizers; AWQ's scaling is folded into the weights.
    assert torch.allclose(plain, ref, rtol=0, atol=1e-4) == plain_matches
    if fmt == "int8_sq":
        assert any(isinstance(getattr(m, "input_quantizer", None), torch.nn.Module) for m in model.modules())


def test_per_level_export_is_refused(megatron, tmp_path):
    from spiral_megatron.quantization import export

    with pytest.raises(ValueError, match="per-level"):
        export.export_hf(quantized_checkpoint(tmp_path / "ckpt", "fp8", per_level=True), tmp_path / "hf")
