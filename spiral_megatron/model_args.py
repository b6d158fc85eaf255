"""ModelArgs: everything needed to rebuild a SpiralGPTModel's architecture, as plain JSON.

Saved as `model_args.json` beside every checkpoint; the converters and the training script
build models from it. Runtime choices (parallel sizes, precision, CPU initialisation) are
not part of it: they are passed to `build_model` as SpiralConfig overrides.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

from spiral_megatron.config import SpiralConfig

ARCHITECTURE_FIELDS = (
    "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
    "normalization", "layernorm_epsilon", "gated_linear_unit", "add_bias_linear", "add_qkv_bias",
    "qk_layernorm", "activation_func_name", "init_method_std", "hidden_dropout", "attention_dropout",
    "num_prelude_layers", "num_core_layers", "num_coda_layers", "chunk_sizes", "chunk_offsets",
    "downscale", "upscale", "shift", "topology", "mesh_slots", "latent_positions", "scale_embeddings",
)


# Architecture fields added after model_args.json files were written, with the value that
# rebuilds those older models (their embeddings were not scaled). A file without the field
# must not silently become another model under the new default.
BEFORE_FIELD = {"scale_embeddings": False}


@dataclass
class ModelArgs:
    """A model's architecture: SpiralConfig fields plus the GPTModel-style arguments."""

    config: Dict[str, Any] = field(default_factory=dict)
    """SpiralConfig keyword arguments of the architecture (see ARCHITECTURE_FIELDS)."""

    vocab_size: int = 0
    """Embedding rows, padded for TP (the tokenizer's vocabulary may be smaller)."""

    max_sequence_length: int = 4096
    """Longest sequence the model was trained for."""

    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the word embeddings."""

    position_embedding_type: str = "rope"
    """"rope" or "none"."""

    rotary_base: int = 10000
    """RoPE base period."""

    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates."""

    @classmethod
    def from_config(cls, config: SpiralConfig, **kwargs) -> "ModelArgs":
        arch = {}
        for name in ARCHITECTURE_FIELDS:
            if name == "activation_func_name":
                arch[name] = config.activation_func.__name__
            else:
                value = getattr(config, name)
                arch[name] = list(value) if isinstance(value, tuple) else value
        return cls(config=arch, **kwargs)

    def spiral_config(self, **runtime) -> SpiralConfig:
        """A SpiralConfig of this architecture plus runtime fields (TP size, dtype, ...)."""
        import torch.nn.functional as F

        arch = dict(self.config)
        act = arch.pop("activation_func_name", "gelu")
        arch["activation_func"] = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[act]
        for name in ("chunk_sizes", "chunk_offsets"):
            if arch.get(name) is not None:
                arch[name] = tuple(arch[name])
        return SpiralConfig(**{**arch, **runtime})

    def to_json(self) -> str:
        """The JSON of `model_args.json`; a BEFORE_FIELD field not set is written with today's
        default, which is what `spiral_config` builds (a later `load` must not change it)."""
        data = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(SpiralConfig) if f.name in BEFORE_FIELD}
        data["config"] = {**defaults, **data["config"]}
        return json.dumps(data, indent=2, sort_keys=True)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> "ModelArgs":
        """From `path`; architecture fields the file predates take the value its model had."""
        args = cls(**json.loads(Path(path).read_text()))
        args.config = {**BEFORE_FIELD, **args.config}
        return args


def build_model(args: ModelArgs, backend: str = "local", pre_process: bool = True,
                post_process: bool = True, pg_collection=None, **runtime):
    """SpiralGPTModel for `args`; `runtime` overrides SpiralConfig fields."""
    from spiral_megatron.layer_specs import get_spiral_model_spec
    from spiral_megatron.model import SpiralGPTModel

    config = args.spiral_config(**runtime)
    return SpiralGPTModel(
        config,
        vocab_size=args.vocab_size,
        max_sequence_length=args.max_sequence_length,
        spec=get_spiral_model_spec(config, backend),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=args.share_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent,
        pg_collection=pg_collection,
    )
