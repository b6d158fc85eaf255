"""Per-iteration activation scales for the shared core: one quantizer set per loop level.

The core runs T times per forward, iteration t on the sequence compressed g_t-fold (docs/MODEL.md
2-3). Its weights are shared, so its weight quantizers are too; its INPUT statistics are not:
a latent that averages 8 tokens has a different range from a single token. Modelopt's max
calibration over the whole forward gives each input quantizer the maximum over all T levels
("shared" scales). `LevelQuantizer` instead holds one copy of the quantizer per level, and the
loop itself selects the copy: each iteration t sets `level = t` on the quantizers listed in
`loop.level_quantizers` before it runs the core (`loop.select_level`). A recomputed iteration
(`recompute_loop_iterations`) sets it again. Megatron's recompute of core modules
(`recompute_granularity` "selective" with `recompute_modules`, or "full") replays them in the
backward, after the loop has moved on: the tensors iteration t saves for backward carry t, and
unpacking them selects level t again before the replay (`select_level`), so every recompute
gives the gradients of no recompute (tests/quantization/test_level_recompute.py).

Our choice [ours]: only activation (input) quantizers are split. Weight quantizers, and
SmoothQuant's/AWQ's per-channel input scaling (`pre_quant_scale`, folded into the shared
weight), stay shared. A weight-only format (INT4 AWQ) therefore has nothing to split.
"""

import copy
from typing import List

import torch


class LevelQuantizer(torch.nn.Module):
    """One modelopt TensorQuantizer per loop level; `level` selects the one that runs.

    State dict keys are `levels.<t>.<quantizer's keys>`, so modelopt's Megatron plugin saves
    their amax like any other quantizer's (it stores every `*_quantizer*_amax`). SmoothQuant's
    per-channel input scaling is shared (it is folded into the shared weight): it is kept here
    as `_pre_quant_scale`, the one name the plugin saves (`input_quantizer._pre_quant_scale`),
    and taken out of the level copies.
    """

    def __init__(self, shared: torch.nn.Module, num_levels: int, smooth_features: int = 0):
        super().__init__()
        self.levels = torch.nn.ModuleList(copy.deepcopy(shared) for _ in range(num_levels))
        self.level = 0
        scale = shared.pre_quant_scale
        if scale is not None:
            self.register_buffer("_pre_quant_scale", scale.detach().clone())
            for q in self.levels:
                del q._pre_quant_scale
        elif smooth_features:  # restoring: the loaded state fills it
            self.register_buffer("_pre_quant_scale", torch.ones(smooth_features))

    @property
    def pre_quant_scale(self):
        return getattr(self, "_pre_quant_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in]
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        return self.levels[self.level](x)

    # modelopt treats a non-TensorQuantizer input quantizer as a sequence of quantizers
    # (its SequentialQuantizer) and inspects the first one: the level copies share settings.
    def __getitem__(self, i: int) -> torch.nn.Module:
        return self.levels[i]

    @property
    def is_enabled(self) -> bool:
        return self.levels[0].is_enabled

    @property
    def _if_calib(self) -> bool:
        return self.levels[0]._if_calib


def core_linears(loop: torch.nn.Module) -> List[torch.nn.Module]:
    """The core's quantized Megatron linear layers (attention QKV/proj, MLP fc1/fc2)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return [m for m in loop.core.modules()
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and hasattr(m, "input_quantizer")]


def split_levels(model: torch.nn.Module, smoothed: bool = False) -> int:
    """Give the input quantizer of every core linear one copy per level (each starting from
    the shared scales); returns how many were split. The loop is told about them
    (`install_levels`).
    `smoothed`: when restoring a SmoothQuant model, make room for its loaded input scaling."""
    loop = getattr(model, "loop", None)
    if loop is None:
        return 0
    num_levels = len(model.levels)
    linears = core_linears(loop)
    for module in linears:
        features = module.weight.shape[1] if smoothed else 0  # this rank's input features
        module.input_quantizer = LevelQuantizer(module.input_quantizer, num_levels, features)
    install_levels(model)
    return len(linears)


def install_levels(model: torch.nn.Module) -> None:
    """Hand the loop its core's LevelQuantizers (idempotent: refreshed after a restore replaced
    modules)."""
    loop = getattr(model, "loop", None)
    if loop is None:
        return
    loop.level_quantizers = [m for m in loop.core.modules() if isinstance(m, LevelQuantizer)]


def has_levels(model: torch.nn.Module) -> bool:
    return any(isinstance(m, LevelQuantizer) for m in model.modules())


def level_quantizers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Every per-level TensorQuantizer, as one container (to calibrate them alone)."""
    return torch.nn.ModuleList(q for m in model.modules() if isinstance(m, LevelQuantizer) for q in m.levels)


@torch.no_grad()
def calibrate_levels(model: torch.nn.Module, forward_loop) -> None:
    """Max-calibrate only the per-level quantizers: each sees only its own level's inputs.
    As in modelopt's own calibration, every other quantizer passes its input unquantized
    meanwhile (SmoothQuant's input scaling stays: it is part of the smoothed model)."""
    from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizers = level_quantizers(model)
    mine = {id(q) for q in quantizers}
    others = [m for m in model.modules()
              if isinstance(m, TensorQuantizer) and id(m) not in mine and m.is_enabled and m._if_quant]
    for q in quantizers:
        if q._calibrator is not None:
            q._calibrator.reset()
    for q in others:
        q.disable_quant()
    try:
        enable_stats_collection(quantizers)
        forward_loop(model)
        finish_stats_collection(quantizers)
    finally:
        for q in others:
            q.enable_quant()
