"""ModelArgs: the record of a SpiralGPTModel's function, as plain JSON.

Saved as `model_args.json` beside every checkpoint; resume compares it, the converters and
tools rebuild the model from it. `config` holds every FUNCTION field of SpiralConfig
(spiral_megatron/config/fields.py), with the activation as the function it computes:
`activation_func_name` "gelu" (erf), "gelu_tanh" (Megatron's fused bias-GeLU, the tanh
approximation), "silu" or "relu". RUNTIME fields (parallel sizes, precision, fusions of
identical math) are not part of it: they are passed to `build_model` as SpiralConfig overrides.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch.nn.functional as F

from spiral_megatron.config.spiral_config import SpiralConfig
from spiral_megatron.config.fields import FUNCTION, kind_of
from spiral_megatron.model.layer_specs import get_spiral_model_spec
from spiral_megatron.model.spiral_gpt_model import SpiralGPTModel

# Folded into `activation_func_name`: what the MLP computes depends on both.
ACTIVATION_FIELDS = ("activation_func", "bias_activation_fusion")
RECORDED_FIELDS = tuple(f.name for f in dataclasses.fields(SpiralConfig)
                        if kind_of(f) == FUNCTION and f.name not in ACTIVATION_FIELDS) + ("activation_func_name",)

# activation_func_name -> (activation_func, bias_activation_fusion it needs; None = either)
ACTIVATIONS = {"gelu": (F.gelu, False), "gelu_tanh": (F.gelu, True), "silu": (F.silu, None),
               "relu": (F.relu, None)}

# Recorded fields added after model_args.json files were written, with the value that
# rebuilds those older models (their embeddings were not scaled). A file without the field
# must not silently become another model under the new default. Fields recorded later still
# (issue 16) take SpiralConfig's default, which is what the old files' models were built with
# by the converters; an old "gelu" is erf, as it was rebuilt.
BEFORE_FIELD = {"scale_embeddings": False}


def activation_name(config: SpiralConfig) -> str:
    """The function the MLP computes: Megatron's fused bias-GeLU (fusions/fused_bias_gelu.py,
    fused_bias_geglu.py) is the tanh approximation, its unfused GeLU is F.gelu (erf)."""
    names = {fn: name for name, (fn, fused) in ACTIVATIONS.items() if fused is not True}
    if config.activation_func not in names:
        raise ValueError(f"activation_func {config.activation_func!r} must be one of {tuple(names)}")
    name = names[config.activation_func]
    return "gelu_tanh" if name == "gelu" and config.bias_activation_fusion else name


@dataclass
class ModelArgs:
    """A model's function: SpiralConfig FUNCTION fields plus the GPTModel-style arguments."""

    config: Dict[str, Any] = field(default_factory=dict)
    """SpiralConfig keyword arguments of the function (see RECORDED_FIELDS)."""

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
        record = {}
        for name in RECORDED_FIELDS[:-1]:
            value = getattr(config, name)
            record[name] = list(value) if isinstance(value, tuple) else value
        record["activation_func_name"] = activation_name(config)
        return cls(config=record, **kwargs)

    def spiral_config(self, **runtime) -> SpiralConfig:
        """A SpiralConfig of this function plus runtime fields (TP size, dtype, ...). A runtime
        `bias_activation_fusion` that would change the recorded GeLU is refused."""
        arch = dict(self.config)
        name = arch.pop("activation_func_name", "gelu")
        if name not in ACTIVATIONS:
            raise ValueError(f"activation_func_name {name!r} must be one of {tuple(ACTIVATIONS)}")
        arch["activation_func"], fused = ACTIVATIONS[name]
        if fused is not None:
            if runtime.get("bias_activation_fusion", fused) != fused:
                raise ValueError(f"bias_activation_fusion {runtime['bias_activation_fusion']} would change the "
                                 f"recorded activation {name!r} (the fused bias-GeLU is the tanh approximation)")
            arch["bias_activation_fusion"] = fused
        for key in ("chunk_sizes", "chunk_offsets"):
            if arch.get(key) is not None:
                arch[key] = tuple(arch[key])
        return SpiralConfig(**{**arch, **runtime})

    def complete(self) -> "ModelArgs":
        """These args with every recorded field filled in with the value the model is built with
        (a hand-made or older record may leave fields out)."""
        if set(self.config) == set(RECORDED_FIELDS):
            return self  # from_config's, or a file it wrote: nothing to fill in
        return dataclasses.replace(self, config=ModelArgs.from_config(self.spiral_config()).config)

    def to_json(self) -> str:
        """The JSON of `model_args.json`: the complete record (a later `load` must not change it)."""
        return json.dumps(dataclasses.asdict(self.complete()), indent=2, sort_keys=True)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> "ModelArgs":
        """From `path`; recorded fields the file predates take the value its model had."""
        args = cls(**json.loads(Path(path).read_text()))
        args.config = {**BEFORE_FIELD, **args.config}
        return args.complete()


def build_model(args: ModelArgs, backend: str = "local", pre_process: bool = True,
                post_process: bool = True, pg_collection=None, **runtime):
    """SpiralGPTModel for `args`; `runtime` overrides SpiralConfig fields."""
    return make_model(args.spiral_config(**runtime), args, backend, pre_process, post_process, pg_collection)


def make_model(config: SpiralConfig, args: ModelArgs, backend: str = "local", pre_process: bool = True,
               post_process: bool = True, pg_collection=None):
    """SpiralGPTModel of `config` (the SpiralConfig) with the GPTModel arguments of `args`."""
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
