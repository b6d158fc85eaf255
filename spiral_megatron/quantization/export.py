"""A quantized checkpoint -> a Hugging Face folder that gives the quantized model's logits.

Form (documented choice): FAKE quantization, not packed low-bit weights.
    weights   every quantized linear's weight is stored as modelopt's quantize-dequantize of
              it (the values the fake-quantized Megatron model multiplies by), in float32, in
              the ordinary HF folder written by the project's converter: the folder loads
              with plain `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`.
    activations  quantization.json (format, quantizer settings) and
              quantization_scales.safetensors (`<hf linear>.input_amax`, `.pre_quant_scale`):
              `load_quantized_hf` loads the folder and puts a modelopt TensorQuantizer with
              these scales in front of every quantized linear (SmoothQuant/AWQ input scaling
              and FP8/INT8 activation fake quantization), so its logits are the quantized
              Megatron model's. Weight-only formats (INT4 AWQ) have no activation quantizers
              and their input scaling is folded into the stored weights: for them the plain
              `from_pretrained` model already gives the quantized logits.
Megatron's fused QKV input quantizer becomes the same quantizer on q_proj, k_proj and v_proj
(one input). Per-level activation scales are refused: the HF loop's levels are not visible
to a module hook (its core runs per level inside one module call), see docs/QUANTIZATION.md.
"""

import json
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

from spiral_megatron.quantization import checkpoint

SPEC_FILE = "quantization.json"
SCALES_FILE = "quantization_scales.safetensors"


def restore_megatron(folder: Path):
    """The quantized TP1 Megatron model of checkpoint iteration `folder` (CPU, eval)."""
    from megatron.core import dist_checkpointing

    from spiral_megatron.conversion import megatron_io

    model = megatron_io.build_megatron(megatron_io.read_model_args(folder))
    if checkpoint.restore_state(model, folder) is None:
        raise ValueError(f"{str(folder)!r} is not a quantized checkpoint (no {checkpoint.RECIPE_FILE})")
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(state["model"])
    return model.eval()


def quantized_linears(model) -> Dict[str, torch.nn.Module]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return {n: m for n, m in model.named_modules()
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and hasattr(m, "weight_quantizer")}


@torch.no_grad()
def fake_quantized_state(model) -> Dict[str, torch.Tensor]:
    """The model's weights (local names), each quantized linear's weight quantize-dequantized."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and "_quantizer" not in k and not k.endswith("._extra_state")}
    for name, m in quantized_linears(model).items():
        w = m.weight_quantizer(m.weight) if m.weight_quantizer.is_enabled else m.weight  # [out, in]
        if _foldable(m):  # AWQ: y = (x * s) W^T = x (W diag(s))^T
            w = w * m.input_quantizer.pre_quant_scale[None, :]
        state[f"{name}.weight"] = w.detach().clone()
    return state


def _foldable(m) -> bool:
    """Input scaling without activation quantization (AWQ) folds into the weight exactly."""
    return m.input_quantizer.pre_quant_scale is not None and not m.input_quantizer.is_enabled


def activation_scales(model) -> Dict[str, Dict[str, torch.Tensor]]:
    """Megatron linear name -> {"input_amax", "pre_quant_scale"} (those it has)."""
    out = {}
    for name, m in quantized_linears(model).items():
        q, entry = m.input_quantizer, {}
        if q.is_enabled and q.amax is not None:
            entry["input_amax"] = q.amax.detach().float().reshape(())
        if q.pre_quant_scale is not None and not _foldable(m):
            entry["pre_quant_scale"] = q.pre_quant_scale.detach().float().clone()
        if entry:
            out[name] = entry
    return out


def _activation_settings(model) -> Optional[dict]:
    for m in quantized_linears(model).values():
        q = m.input_quantizer
        if q.is_enabled:
            return {"num_bits": q.num_bits, "axis": q.axis}
    return None


def _hf_names(megatron_name: str, weight: torch.Tensor, shapes) -> list:
    """HF linear names fed by Megatron linear `megatron_name`, by the converter's own table."""
    from spiral_megatron.conversion import mapping

    return [k[: -len(".weight")] for k in mapping.megatron_to_hf({f"{megatron_name}.weight": weight}, shapes, False)]


def export_hf(load: str, out: str, iteration: Optional[int] = None, force: bool = False) -> dict:
    """Write the HF folder of the quantized checkpoint under `load`; returns the converter's
    result plus the Megatron model (for checks)."""
    from safetensors.torch import save_file

    from spiral_megatron.conversion import convert, hf_config, megatron_io

    folder, iteration = megatron_io.find_checkpoint(load, iteration)
    recipe = checkpoint.read_recipe(folder)
    if recipe is None:
        raise ValueError(f"{str(folder)!r} is not quantized; use tools/convert_to_hf.py")
    if recipe.per_level:
        raise ValueError(f"{str(folder)!r} has per-level activation scales, which the HF export does not "
                         "support (the HF loop's levels are not visible to module hooks); export shared scales")
    model = restore_megatron(folder)
    tokenizer = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None

    def write_scales(hf_folder: Path, config) -> None:  # inside the converter's folder, before it is swapped in
        shapes = hf_config.shapes_of(config)
        linears = quantized_linears(model)
        scales = {}
        for name, entry in activation_scales(model).items():
            for hf in _hf_names(name, linears[name].weight, shapes):
                scales.update({f"{hf}.{k}": v.clone() for k, v in entry.items()})
        spec = {"format": recipe.format, "per_level": False, "source_iteration": iteration,
                "weights": "fake-quantized: stored values are modelopt's quantize-dequantize of the weights",
                "activations": _activation_settings(model)}
        (hf_folder / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        save_file(scales, str(hf_folder / SCALES_FILE))

    with tempfile.TemporaryDirectory() as tmp:  # the converter reads checkpoints: give it one
        megatron_io.write_checkpoint(tmp, iteration, megatron_io.read_model_args(folder),
                                     fake_quantized_state(model), tokenizer)
        result = convert.megatron_to_hf_folder(tmp, out, iteration, "fp32", force, extra=write_scales)
    return dict(result, megatron=model)


def load_quantized_hf(folder):
    """The HF model of an exported folder with modelopt activation quantizers in front of
    every quantized linear (each added as the linear's `input_quantizer` submodule)."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer
    from safetensors.torch import load_file

    from spiral_megatron.conversion.convert import load_hf

    folder = Path(folder)
    spec = json.loads((folder / SPEC_FILE).read_text())
    scales = load_file(str(folder / SCALES_FILE))
    model = load_hf(folder)
    settings = spec["activations"]
    for name in sorted({k.rsplit(".", 1)[0] for k in scales}):
        linear = model.get_submodule(name)
        amax, pqs = scales.get(f"{name}.input_amax"), scales.get(f"{name}.pre_quant_scale")
        if amax is not None:
            num_bits = settings["num_bits"]
            q = TensorQuantizer(QuantizerAttributeConfig(
                num_bits=tuple(num_bits) if isinstance(num_bits, list) else num_bits, axis=settings["axis"]))
            q.amax = amax
        else:  # input scaling only (a disabled quantizer still applies it)
            q = TensorQuantizer()
            q.disable()
        if pqs is not None:
            q.pre_quant_scale = pqs
        linear.add_module("input_quantizer", q)
        linear.register_forward_pre_hook(lambda m, args: (m.input_quantizer(args[0]),) + tuple(args[1:]))
    return model.eval()
