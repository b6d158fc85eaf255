"""Post-training quantization of a SpiralGPTModel with modelopt (fake quantization).

    model = quantize(model, "fp8", forward_loop)                   # shared scales
    model = quantize(model, "int8_sq", forward_loop, per_level=True)  # one set per loop level

`forward_loop(model)` runs the calibration batches. Calibration hooks every quantizer and
records statistics on every call; the looped core is called T times per forward, so its
shared quantizers see all T resolutions and keep the maximum (tests/quantization prove it).
"""

from dataclasses import dataclass

import torch

from spiral_megatron.quantization import levels
from spiral_megatron.quantization.formats import check_format, quant_config, quantizes_activations


@dataclass(frozen=True)
class QuantRecipe:
    """What was applied: stored as quantization.json next to the checkpoint's modelopt state."""

    format: str
    """A key of formats.FORMATS."""

    per_level: bool = False
    """One activation quantizer set per loop level for the core (else shared over levels)."""

    def to_dict(self) -> dict:
        return {"format": self.format, "per_level": self.per_level}


def quantize(model: torch.nn.Module, fmt: str, forward_loop, per_level: bool = False) -> torch.nn.Module:
    """modelopt PTQ in place (modelopt swaps module classes); returns the model.

    per_level on a weight-only format (int4_awq) is refused: it has no activation scales.
    """
    import modelopt.torch.quantization as mtq

    check_format(fmt)
    if per_level and not quantizes_activations(fmt):
        raise ValueError(f"format {fmt!r} quantizes weights only: per-level activation scales do not apply")
    model = mtq.quantize(model, quant_config(fmt), forward_loop)
    if per_level:
        levels.split_levels(model)
        levels.calibrate_levels(model, forward_loop)
    model.spiral_quant_recipe = QuantRecipe(fmt, per_level)  # what a checkpoint save records
    return model


def quantizer_summary(model: torch.nn.Module) -> dict:
    """Counts of enabled weight/input quantizers (a per-level set counts once per level)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    counts = {"weight": 0, "input": 0}
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer) and m.is_enabled:
            kind = "weight" if "weight_quantizer" in name else "input" if "input_quantizer" in name else None
            if kind:
                counts[kind] += 1
    return counts
