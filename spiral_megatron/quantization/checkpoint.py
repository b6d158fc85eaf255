"""Quantized checkpoints: Megatron dist checkpoint + modelopt state, as Megatron-LM does.

Megatron-LM's post-training flow (megatron/post_training/checkpointing.py) saves a quantized
model as an ordinary dist checkpoint (the quantizers' amax and SmoothQuant scales are sharded
tensors of the model, their settings the quantized modules' `_extra_state`) plus the global
modelopt state in `ITER/modelopt_state/`. Loading restores the modelopt state onto the freshly
built model first (so its modules become quantized modules), then loads the checkpoint as
usual. We do the same, plus one file of our own:
    ITER/modelopt_state/          mto.modelopt_state, per-module state stripped (modelopt's plugin)
    ITER/quantization.json        {"format": ..., "per_level": ...}: the per-level quantizers
                                  are our modules, rebuilt before the load
"""

import json
from pathlib import Path
from typing import Optional

import torch

from spiral_megatron.errors import ConfigError
from spiral_megatron.quantization import levels, swiglu_scales
from spiral_megatron.quantization.ptq import QuantRecipe
from spiral_megatron.job.checkpoint.checkpointing import iteration_dir, latest_iteration
from spiral_megatron.job.checkpoint.extra_state import ExtraState

RECIPE_FILE = "quantization.json"
STATE_DIR = "modelopt_state"


def is_quantized(model: torch.nn.Module) -> bool:
    try:
        import modelopt.torch.opt as mto
    except ImportError:
        return False
    return mto.ModeloptStateManager.is_converted(model)


def read_recipe(folder) -> Optional[QuantRecipe]:
    """The recipe of the checkpoint iteration folder, or None for an unquantized one."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    return QuantRecipe(**json.loads(path.read_text()))


def save_state(model: torch.nn.Module, folder, recipe: QuantRecipe) -> None:
    """After the model's dist checkpoint is saved in `folder`: the modelopt state and recipe
    (every rank calls it: modelopt saves through dist_checkpointing)."""
    import torch.distributed as dist
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    save_sharded_modelopt_state([model], str(folder))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(folder) / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")


def restore_state(model: torch.nn.Module, folder) -> Optional[QuantRecipe]:
    """Before loading the checkpoint in `folder` into `model`: make `model` the quantized model
    it was (modelopt modules, our per-level quantizers, the quantizers' settings). The amax
    values then arrive with the ordinary load. Returns the recipe, or None (not quantized).

    modelopt converts the model in place (it swaps module classes), so `model` stays valid.
    """
    recipe = read_recipe(folder)
    if recipe is None:
        return None
    import modelopt.torch.opt as mto
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import _load_extra_state_from_sharded_checkpoint

    if mto.ModeloptStateManager.is_converted(model):
        raise ValueError("restore_state: the model is already quantized")
    common = dist_checkpointing.load_common_state_dict(str(Path(folder) / STATE_DIR))
    restored = mto.restore_from_modelopt_state(model, common)
    assert restored is model, "modelopt restored into a new model object"
    if recipe.per_level:
        levels.split_levels(model, smoothed=recipe.format == "int8_sq")
    # Megatron-LM's loader does this step too: quantizer settings (and buffer shapes) from the
    # `_extra_state` entries, before the full load fills the values.
    _load_extra_state_from_sharded_checkpoint(model, str(folder), prefix="")
    swiglu_scales.shard_like_weight(model)
    _check_blocks(model, recipe)
    model.spiral_quant_recipe = recipe  # what save_for_training writes back
    return recipe


def _check_blocks(model: torch.nn.Module, recipe: QuantRecipe) -> None:
    """Refuse a tensor-parallel size at which a row-parallel layer's weight blocks (int4 AWQ's
    128 inputs per scale) would straddle two ranks: its scales then do not fit the checkpoint's."""
    for name, module in model.named_modules():
        sizes = getattr(getattr(module, "weight_quantizer", None), "block_sizes", None) or {}
        block, local = sizes.get(-1), getattr(module, "input_size_per_partition", None)
        if block and local and local != module.input_size and local % block:
            raise ConfigError(f"{recipe.format}: {name} has {local} of its {module.input_size} input features per "
                              f"tensor-parallel rank, not a multiple of the weight blocks of {block}; load this "
                              f"checkpoint at a tensor-parallel size that gives each rank a multiple of {block}")


# ---- the training job's two hooks (quantization-aware training), registered as TRAINING_HOOK ----
def restore_for_training(model: torch.nn.Module, load) -> None:
    """Called by the job after building the model, before DDP and the optimizer: when the
    checkpoint it will `--load` is quantized, the model becomes the quantized model (modelopt
    is imported only then). Training on runs with fake quantization (QAT): modelopt's
    quantizers pass gradients straight through, with the calibrated scales fixed."""
    iteration = latest_iteration(load)
    if iteration is None:  # nothing to resume yet (the job starts from scratch)
        return
    folder = iteration_dir(load, iteration)
    if read_recipe(folder) is not None:
        restore_state(model, folder)


def save_for_training(model: torch.nn.Module, folder) -> None:
    """Called by the job after saving a checkpoint: a quantized model adds its modelopt state."""
    recipe = getattr(model, "spiral_quant_recipe", None)
    if recipe is not None:
        save_state(model, folder, recipe)


# What the training job's entry point registers (job/checkpoint/extra_state.py).
TRAINING_HOOK = ExtraState(restore=restore_for_training, save=save_for_training)
