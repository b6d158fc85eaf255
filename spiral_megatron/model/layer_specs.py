"""ModuleSpecs: which modules build SpiralFormer, for the `local` and `transformer_engine` backends.

The transformer layer is Megatron's own GPT layer spec (prelude, core and coda all use it);
what SpiralFormer adds (down-scale, up-scale, topology) is chosen here from the config's
option names, so the model code never branches on them. The core attention follows
Megatron's `attention_backend` setting (`core_attention_for`).

These are not Megatron-LM `--spec` targets: Megatron-LM's `pretrain_gpt.py` builds a GPTModel,
which would run a layer spec as plain layers, without the loop.
"""

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from spiral_megatron.model import resampling, topology
from spiral_megatron.model.norm import TorchNorm
from spiral_megatron.model.sdpa_attention import SDPAttention

BACKENDS = ("local", "transformer_engine")

DOWNSCALE = {"self-aggregation": resampling.SelfAggregation, "mean": resampling.MeanPool}
UPSCALE = {"allocate": resampling.Allocate, "repeat": resampling.Repeat}
TOPOLOGY = {"residual": topology.Residual, "anchor": topology.Anchor, "mesh": topology.Mesh}


@dataclass
class SpiralLoopSubmodules:
    """The loop of docs/MODEL.md section 3: a core built from `layer`, plus the resampling ops."""

    layer: ModuleSpec
    """The TransformerLayer spec of the shared core."""

    downscale: Union[ModuleSpec, type]
    """Tokens -> latents, one module per iteration with chunk size > 1."""

    upscale: Union[ModuleSpec, type]
    """Latent update -> token update, one module per iteration with chunk size > 1."""

    topology: Union[ModuleSpec, type]
    """Merges each iteration's update into the loop state."""


@dataclass
class SpiralModelSubmodules:
    """Everything SpiralGPTModel builds besides embedding and output layer."""

    layer: ModuleSpec
    """The TransformerLayer spec of prelude and coda."""

    final_norm: Union[ModuleSpec, type]
    """The norm before the output layer."""

    loop: SpiralLoopSubmodules
    """The looped core."""


def megatron_chose_apex_norm() -> bool:
    """True when Megatron's local spec uses apex's FusedLayerNorm (apex importable, as in NGC)."""
    from megatron.core.models.gpt import gpt_layer_specs

    return bool(getattr(gpt_layer_specs, "HAVE_APEX", False))


def _sp_aware(norm):
    """Megatron's norm, except its plain-torch fallback (which refuses sequence parallelism):
    apex's FusedLayerNorm (NGC containers) is kept, as Megatron-LM would use it."""
    return TorchNorm if norm is WrappedTorchNorm else norm


def get_spiral_layer_local_spec(normalization: str = "LayerNorm", qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron's local GPT layer; its torch-norm fallback replaced by one that also works under
    sequence parallelism, the query and key norms' too (`qk_layernorm`: Megatron sums their
    gradients over the TP group by name, with or without sequence parallelism)."""
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    attention = spec.submodules.self_attention
    heads = attention.submodules
    if qk_layernorm:
        heads = dataclasses.replace(heads, q_layernorm=_sp_aware(heads.q_layernorm),
                                    k_layernorm=_sp_aware(heads.k_layernorm))
    sub = dataclasses.replace(spec.submodules, input_layernorm=_sp_aware(spec.submodules.input_layernorm),
                              pre_mlp_layernorm=_sp_aware(spec.submodules.pre_mlp_layernorm),
                              self_attention=dataclasses.replace(attention, submodules=heads))
    return dataclasses.replace(spec, submodules=sub)


def have_transformer_engine() -> bool:
    """True when Transformer Engine imports (Megatron's own check), without raising."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


def _require_transformer_engine():
    if not have_transformer_engine():
        raise RuntimeError(
            "backend 'transformer_engine' needs Transformer Engine (pip install "
            "'spiral_megatron[te]' on a CUDA machine), which is not importable here; "
            "use backend 'local'"
        )


def get_spiral_layer_te_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron's Transformer Engine GPT layer (fused norms, FP8); needs TE."""
    _require_transformer_engine()
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def core_attention_for(backend: str, attention_backend: AttnBackend, on_cuda: bool):
    """The core attention for Megatron's `attention_backend`, or None to keep the layer spec's.

    Local spec: `unfused` and `local` keep Megatron's DotProductAttention; `flash` and `fused`
    take torch's scaled_dot_product_attention (SDPAttention; torch picks its flash, cuDNN or
    memory-efficient kernel); `auto` takes SDPAttention on CUDA and keeps Megatron's on CPU
    [ours: the CPU suite's references, and SDPA gains nothing on CPU with dropout].
    Transformer Engine spec: TE's attention, whose kernel the same setting selects, except
    `local`, which is Megatron's DotProductAttention (as Megatron-LM's GPT builder does).
    """
    if backend == "transformer_engine":
        return DotProductAttention if attention_backend == AttnBackend.local else None
    if attention_backend in (AttnBackend.flash, AttnBackend.fused):
        return SDPAttention
    return SDPAttention if attention_backend == AttnBackend.auto and on_cuda else None


def with_core_attention(layer: ModuleSpec, core_attention) -> ModuleSpec:
    """`layer` (a GPT TransformerLayer spec) with its self-attention's core attention replaced."""
    attention = layer.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=core_attention))
    return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, self_attention=attention))


def _final_norm(backend: str, layer: ModuleSpec):
    if backend == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return layer.submodules.input_layernorm  # the local layers' own choice (apex or SP-aware torch)


def get_spiral_model_spec(config, backend: str = "local") -> SpiralModelSubmodules:
    """The full SpiralFormer spec for `config` (a SpiralConfig) on one backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} must be one of {BACKENDS}")
    if backend == "transformer_engine":
        layer = get_spiral_layer_te_spec(qk_layernorm=config.qk_layernorm)
    else:
        layer = get_spiral_layer_local_spec(config.normalization, qk_layernorm=config.qk_layernorm)
    core_attention = core_attention_for(backend, config.attention_backend, torch.cuda.is_available())
    if core_attention is not None:
        layer = with_core_attention(layer, core_attention)
    loop = SpiralLoopSubmodules(
        layer=layer,
        downscale=DOWNSCALE[config.downscale],
        upscale=UPSCALE[config.upscale],
        topology=TOPOLOGY[config.topology],
    )
    return SpiralModelSubmodules(layer=layer, final_norm=_final_norm(backend, layer), loop=loop)
