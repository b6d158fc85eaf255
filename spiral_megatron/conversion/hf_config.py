"""ModelArgs (Megatron architecture) <-> SpiralFormerConfig (Hugging Face), with the checks
that refuse what the HF model cannot express."""

from typing import Optional

from spiral_megatron.conversion.mapping import Shapes
from spiral_megatron.hf.configuration_spiral import NORMALIZATIONS, SpiralFormerConfig
from spiral_megatron.model.model_args import ModelArgs

AUTO_MAP = {
    "AutoConfig": "configuration_spiral.SpiralFormerConfig",
    "AutoModel": "modeling_spiral.SpiralModel",
    "AutoModelForCausalLM": "modeling_spiral.SpiralForCausalLM",
    "AutoModelForSequenceClassification": "classification_spiral.SpiralForSequenceClassification",
    "AutoModelForTokenClassification": "classification_spiral.SpiralForTokenClassification",
    "AutoModelForQuestionAnswering": "classification_spiral.SpiralForQuestionAnswering",
}
# Recorded FUNCTION fields (model_args.RECORDED_FIELDS) the HF model implements one way only:
# another value is refused by name. Every other recorded field is carried (CONFIG_NAMES,
# LIST_NAMES, HIDDEN_ACT); tests/unit/test_model_fields.py checks that none is left out.
HF_FIXED = {
    "rotary_interleaved": False,
    "apply_residual_connection_post_layernorm": False,
    "layernorm_zero_centered_gamma": False,
    "qk_l2_norm": False,
    "softmax_scale": None,
    "glu_linear_offset": 0.0,
    "activation_func_clamp_value": None,
    "use_te_activation_func": False,
}
# activation_func_name -> hidden_act (transformers' names: "gelu_pytorch_tanh" is the tanh
# approximation that Megatron's fused bias-GeLU computes).
HIDDEN_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}


class UnsupportedConfigError(ValueError):
    """The Megatron model uses a feature the Hugging Face model does not implement."""


def check_expressible(args: ModelArgs) -> None:
    """Raise UnsupportedConfigError naming every field the HF side cannot express."""
    record = args.complete().config
    bad = [f"{name}={record[name]!r} (HF supports {value!r})"
           for name, value in HF_FIXED.items() if record[name] != value]
    act = record["activation_func_name"]
    if act not in HIDDEN_ACT:
        bad.append(f"activation {act!r} (HF supports {tuple(HIDDEN_ACT)})")
    if record["normalization"] not in NORMALIZATIONS:
        bad.append(f"normalization {record['normalization']!r} (HF supports {NORMALIZATIONS})")
    if args.position_embedding_type not in ("rope", "none"):
        bad.append(f"position_embedding_type {args.position_embedding_type!r} (HF supports 'rope', 'none')")
    if bad:
        raise UnsupportedConfigError("the Hugging Face SpiralFormer cannot express: " + "; ".join(bad))


# SpiralConfig field -> SpiralFormerConfig field, copied as is in both directions.
CONFIG_NAMES = (
    ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "intermediate_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "num_key_value_heads"),
    ("kv_channels", "head_dim"),
    ("num_prelude_layers", "num_prelude_layers"),
    ("num_core_layers", "num_core_layers"),
    ("num_coda_layers", "num_coda_layers"),
    ("downscale", "downscale"),
    ("upscale", "upscale"),
    ("shift", "shift"),
    ("topology", "topology"),
    ("mesh_slots", "mesh_slots"),
    ("latent_positions", "latent_positions"),
    ("scale_embeddings", "scale_embeddings"),
    ("normalization", "normalization"),
    ("layernorm_epsilon", "layer_norm_eps"),
    ("gated_linear_unit", "gated_linear_unit"),
    ("add_bias_linear", "add_bias_linear"),
    ("add_qkv_bias", "add_qkv_bias"),
    ("qk_layernorm", "qk_layernorm"),
    ("init_method_std", "initializer_range"),
    ("hidden_dropout", "hidden_dropout"),
    ("attention_dropout", "attention_dropout"),
    ("embedding_init_method_std", "embedding_initializer_range"),
    ("unrolled_output_init", "unrolled_output_init"),
)
LIST_NAMES = (("chunk_sizes", "chunk_sizes"), ("chunk_offsets", "chunk_offsets"))  # tuple <-> list


def _as_list(value):
    return list(value) if value is not None else None


def to_hf_config(args: ModelArgs, vocab_size: Optional[int] = None, **extra) -> SpiralFormerConfig:
    """The HF config of a Megatron architecture; `vocab_size` = the tokenizer's (rows trimmed)."""
    check_expressible(args)
    c = args.complete().config
    vocab_size = vocab_size or args.vocab_size
    if vocab_size > args.vocab_size:
        raise ValueError(f"tokenizer vocabulary {vocab_size} is larger than the model's {args.vocab_size} rows")
    fields = {hf: c[mc] for mc, hf in CONFIG_NAMES}
    fields.update({hf: _as_list(c[mc]) for mc, hf in LIST_NAMES})
    config = SpiralFormerConfig(
        **fields,
        vocab_size=vocab_size,
        megatron_vocab_size=args.vocab_size,
        hidden_act=HIDDEN_ACT[c["activation_func_name"]],
        position_embedding_type=args.position_embedding_type,
        rope_theta=float(args.rotary_base),
        rotary_percent=args.rotary_percent,
        max_position_embeddings=args.max_sequence_length,
        tie_word_embeddings=args.share_embeddings_and_output_weights,
        architectures=["SpiralForCausalLM"],
        **extra,
    )
    config.auto_map = dict(AUTO_MAP)
    return config


def to_model_args(config: SpiralFormerConfig) -> ModelArgs:
    """The Megatron architecture of an HF config (the reverse of `to_hf_config`)."""
    arch = {mc: getattr(config, hf) for mc, hf in CONFIG_NAMES}
    arch.update({mc: _as_list(getattr(config, hf)) for mc, hf in LIST_NAMES})
    arch["activation_func_name"] = {hf: mc for mc, hf in HIDDEN_ACT.items()}[config.hidden_act]
    return ModelArgs(
        config=arch,
        vocab_size=config.megatron_vocab_size or config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        share_embeddings_and_output_weights=bool(config.tie_word_embeddings),
        position_embedding_type=config.position_embedding_type,
        rotary_base=int(config.rope_theta) if float(config.rope_theta).is_integer() else config.rope_theta,
        rotary_percent=config.rotary_percent,
    )


def shapes_of(config: SpiralFormerConfig) -> Shapes:
    return Shapes(
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        head_dim=config.head_dim,
        gated_linear_unit=config.gated_linear_unit,
        vocab_size=config.vocab_size,
        megatron_vocab_size=config.megatron_vocab_size or config.vocab_size,
    )
