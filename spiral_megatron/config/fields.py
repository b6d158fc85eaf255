"""What a model setting is, in three classes (docs/CONFIG.md). Imports nothing of the package.

* FUNCTION: changes what the model computes (architecture, activation and its approximation,
  norms, rotary layout, dropout, initialisation). Recorded in model_args.json, compared on
  resume (a change is refused naming the field), carried to the Hugging Face config or the
  conversion refuses naming the field.
* RUNTIME: numerics and how the job runs: precision, fusions whose math is identical,
  recompute, parallel layout. Free to change between runs.
* REFUSED: features SpiralGPTModel does not build, and fields the job sets from its own keys
  (the reasons are in spiral_megatron/job/settings/model_fields.py).

SpiralConfig's own fields say their class where they are declared (`metadata=kind(...)`);
TransformerConfig's fields are declared by Megatron, so they are listed here.
"""

import dataclasses
from typing import Dict

FUNCTION, RUNTIME, REFUSED = "function", "runtime", "refused"


def kind(name: str) -> Dict[str, str]:
    """`dataclasses.field(metadata=kind(FUNCTION))`."""
    return {"kind": name}


# TransformerConfig fields that change the function; every other accepted one is RUNTIME.
# Fused kernels read as RUNTIME after checking Megatron's code (megatron/core/fusions/):
# bias-SwiGLU, bias-dropout-add, masked softmax, RoPE, gradient accumulation and cross-entropy
# fusions compute the same math. bias_activation_fusion is FUNCTION: with GeLU, Megatron's
# fused bias-GeLU/GeGLU is the tanh approximation (fused_bias_gelu.py), the unfused path erf.
MEGATRON_FUNCTION = frozenset({
    "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
    "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma", "gated_linear_unit",
    "add_bias_linear", "add_qkv_bias", "qk_layernorm", "qk_l2_norm", "activation_func",
    "bias_activation_fusion", "use_te_activation_func", "glu_linear_offset",
    "activation_func_clamp_value", "softmax_scale", "rotary_interleaved",
    "apply_residual_connection_post_layernorm", "hidden_dropout", "attention_dropout",
    "init_method_std", "embedding_init_method_std",
})


def kind_of(field: dataclasses.Field) -> str:
    """FUNCTION or RUNTIME for a SpiralConfig field (REFUSED is decided by the job's checks)."""
    return field.metadata.get("kind") or (FUNCTION if field.name in MEGATRON_FUNCTION else RUNTIME)
