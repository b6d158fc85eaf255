"""The kernel fusions Megatron-LM turns on by default on GPUs, on where their kernel exists.

Megatron-LM's `pretrain_gpt.py` enables bias-GeLU, bias-dropout-add, masked-softmax, RoPE and
gradient-accumulation fusion unless told `--no-...` (megatron/training/arguments.py);
TransformerConfig's own defaults are all off. `defaults()` gives Megatron-LM's choice for one
run: on CUDA each fusion whose kernel is importable, off with one line saying why otherwise;
on CPU every fusion is off (no CUDA kernels). A `model.<fusion>` the user sets wins.
Where the local spec's core attention is torch's SDPA (layer_specs.core_attention_for), the
masked-softmax fusion has nothing to fuse: it is off, and its line names the attention.
"""

import importlib.util
from typing import Callable, Dict, List, Tuple

import torch.nn.functional as F

from spiral_megatron.model.layer_specs import megatron_chose_apex_norm


def _module_exists(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _te_rope_available() -> bool:
    from megatron.core.models.common.embeddings import rope_utils

    return getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None


def _apex_norm() -> bool:
    return megatron_chose_apex_norm()


# fusion field -> (is the kernel there? (backend -> bool), what is missing)
PROBES: Dict[str, Tuple[Callable[[str], bool], str]] = {
    "bias_activation_fusion": (lambda backend: True, ""),  # torch.jit / TE: always there on CUDA
    "bias_dropout_fusion": (lambda backend: True, ""),
    "masked_softmax_fusion": (
        lambda backend: backend == "transformer_engine" or (
            _module_exists("scaled_upper_triang_masked_softmax_cuda") and _module_exists("scaled_masked_softmax_cuda")),
        "Megatron's fused softmax kernels (scaled_*masked_softmax_cuda, from apex/NGC) are not importable",
    ),
    "apply_rope_fusion": (lambda backend: _te_rope_available(), "Transformer Engine's fused RoPE is not importable"),
    # The output layer is always Megatron's own ColumnParallelLinear, which needs apex's kernel
    # for this fusion (TE linears have their own), so the kernel must be there for any backend.
    "gradient_accumulation_fusion": (
        lambda backend: _module_exists("fused_weight_gradient_mlp_cuda"),
        "fused_weight_gradient_mlp_cuda (apex) is not importable",
    ),
    "persist_layer_norm": (lambda backend: backend == "local" and _apex_norm(), "apex's fused LayerNorm is not in use"),
}


def _attention_rule(name: str, backend: str, arch) -> str:
    """Why `name` cannot or need not be on with this run's core attention on CUDA, or ''."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnBackend

    from spiral_megatron.model.layer_specs import core_attention_for
    from spiral_megatron.model.sdpa_attention import SDPAttention

    if name != "masked_softmax_fusion":
        return ""
    setting = arch.get("attention_backend", AttnBackend.auto)
    core = core_attention_for(backend, setting, True)
    if core is SDPAttention:
        return (f"not used: the core attention is torch's scaled_dot_product_attention (attention_backend "
                f"{setting.name}; 'unfused' keeps Megatron's)")
    if core is DotProductAttention and not PROBES[name][0]("local"):  # TE layers with Megatron's attention
        return f"attention_backend local runs Megatron's attention in the TE layers, and {PROBES[name][1]}"
    return ""


def _config_rule(name: str, arch) -> str:
    """Why TransformerConfig itself would refuse `name` for this architecture, or ''."""
    if name == "bias_activation_fusion":
        act = arch.get("activation_func", F.gelu)
        if act not in (F.gelu, F.silu) or (act is F.silu and not arch.get("gated_linear_unit", False)):
            # Megatron's MLP fuses GeLU, GeGLU and SwiGLU only (a plain SiLU raises in forward)
            return f"activation {getattr(act, '__name__', act)} has no fused bias kernel"
        if act is F.gelu and not arch.get("gated_linear_unit", False) and not arch.get("add_bias_linear", True):
            return "add_bias_linear false (the fused bias-GeLU needs a bias)"
    if name == "apply_rope_fusion" and arch.get("rotary_interleaved", False):
        return "rotary_interleaved true"
    return ""


def defaults(on_cuda: bool, backend: str, arch: dict) -> Tuple[Dict[str, bool], List[str]]:
    """(Megatron-LM's fusion settings for this run, one line per fusion left off on CUDA)."""
    if not on_cuda:
        return {name: False for name in PROBES}, []
    settings, notes = {}, []
    for name, (available, missing) in PROBES.items():
        rule = _config_rule(name, arch) or _attention_rule(name, backend, arch)
        settings[name] = available(backend) and not rule
        quiet = name == "persist_layer_norm" and backend != "local"  # TE norms do not read it
        if not settings[name] and not quiet:
            notes.append(f"fusion {name} off: {rule or missing} (set model.{name} to override)")
    return settings, notes
