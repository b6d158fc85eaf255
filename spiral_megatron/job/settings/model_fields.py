"""Which SpiralConfig fields a user may set as `model.<field>`, and what happens to each.

Every field a user sets (YAML `model:` mapping or `--model.<field>`) either reaches the
SpiralConfig the job builds the model with (function fields are recorded in model_args.json),
or is refused here before any compute with a ConfigError naming the field and the reason:
  * JOB_FIELDS: the job sets them from its own keys (`--tensor-parallel`, `--precision`, ...);
  * Python objects (callables, dtypes, context managers): not expressible in a config;
  * REFUSED fields (spiral_megatron/config/megatron_fields.py: features SpiralGPTModel does not
    build, fields nothing reads) set to another value than their default;
  * fields of a megatron-core release that nobody has classified yet.
`tests/unit/test_model_fields.py` walks every field.
"""

import dataclasses
import typing
from typing import Any, Dict

import torch.nn.functional as F

from spiral_megatron.config.fields import REFUSED, kind_of, refusal
from spiral_megatron.config.spiral_config import SpiralConfig
from spiral_megatron.model.layer_specs import BACKENDS, have_transformer_engine
from spiral_megatron.job.settings.keys import ConfigError, coerce

# field -> the job key that sets it
JOB_FIELDS = {
    "tensor_model_parallel_size": "tensor_parallel",
    "pipeline_model_parallel_size": "pipeline_parallel",
    "sequence_parallel": "sequence_parallel",
    "fp16": "precision",
    "bf16": "precision",
    "params_dtype": "precision",
    "pipeline_dtype": "precision",
    "autocast_dtype": "precision",
    "enable_autocast": "precision",
    "fp8": "fp8",
    "fp8_recipe": "fp8_recipe",
    "use_cpu_initialization": "the device (True on CPU; on GPUs weights are drawn on the device)",
    "perform_initialization": "the job (weights are drawn layout-independently, spiral_megatron/model/init.py)",
    "variable_seq_lengths": "SpiralConfig (on whenever the loop crosses pipeline stages)",
    "num_layers": "num_prelude_layers + num_core_layers + num_coda_layers",
    "inference_rng_tracker": "the job (spiral_megatron.parallel.initialize)",
}

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


def _plain(tp) -> bool:
    """True for a type a YAML value can hold: bool/int/float/str, Literal, Optional/Union/List/Tuple of them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (bool, int, float, str, type(None)):
        return True
    if origin is typing.Literal:
        return True
    if origin in (typing.Union, list, tuple, typing.List, typing.Tuple):
        return all(a is Ellipsis or _plain(a) for a in args)
    return False


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def why_refused(name: str, value: Any):
    """The reason `model.<name> = value` is refused, or None when the model carries it."""
    fields = {f.name: f for f in dataclasses.fields(SpiralConfig)}
    if name == "activation_func":
        return None if value in ACTIVATIONS else f"must be one of {tuple(ACTIVATIONS)}"
    if name == "attention_backend":  # Megatron's AttnBackend, by name (layer_specs.core_attention_for)
        names = tuple(_attention_backends())
        return None if isinstance(value, str) and value in names else f"must be one of {names}"
    if name not in fields:
        return "not a SpiralConfig field"
    if name in JOB_FIELDS:
        return f"set by {JOB_FIELDS[name]}" if " " in JOB_FIELDS[name] else f"set it with the job key '{JOB_FIELDS[name]}'"
    if not _plain(typing.get_type_hints(SpiralConfig)[name]):
        return "a Python object, not settable from a config"
    if name == "transformer_impl":
        return _why_not_backend(value)
    if value == _default(fields[name]):
        return None  # the default is what every model gets anyway
    kind = kind_of(fields[name])
    if kind is None:
        return ("a megatron-core field nobody has classified as function, runtime or refused yet "
                "(spiral_megatron/config/megatron_fields.py, docs/CONFIG.md)")
    return refusal(name) if kind == REFUSED else None


def check(model: Dict[str, Any]) -> None:
    """Refuse every `model.<field>` the built model would not carry (ConfigError names it)."""
    for name, value in model.items():
        reason = why_refused(name, value)
        if reason is not None:
            raise ConfigError(f"model.{name} {value!r} is refused: {reason}")


def typed(model: Dict[str, Any]) -> Dict[str, Any]:
    """`model` with the numbers and flags the YAML reader left as text (`1e-6`) as their
    SpiralConfig field's type; a ConfigError names a value that is not one."""
    hints = typing.get_type_hints(SpiralConfig)
    return {name: _typed(name, value, hints.get(name)) for name, value in model.items()}


def as_config_kwargs(model: Dict[str, Any]) -> Dict[str, Any]:
    """`model` overrides as SpiralConfig keyword arguments (typed; activation names -> functions)."""
    out = typed(model)
    if isinstance(out.get("activation_func"), str):
        out["activation_func"] = ACTIVATIONS[out["activation_func"]]
    if isinstance(out.get("attention_backend"), str):
        out["attention_backend"] = _attention_backends()[out["attention_backend"]]
    return out


def _attention_backends():
    from megatron.core.transformer.enums import AttnBackend

    return {b.name: b for b in AttnBackend}


def _typed(name: str, value: Any, tp) -> Any:
    """`value` as `tp` when that is bool, int or float (or Optional of one); others unchanged
    (SpiralConfig parses its tuples and checks its choices itself)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
    if value is None or len(args) != 1 or args[0] not in (bool, int, float):
        return value
    try:
        return coerce(f"model.{name}", value, args[0])
    except ConfigError:
        raise ConfigError(f"model.{name} {value!r} is refused: not a {args[0].__name__}") from None


def _why_not_backend(value):
    """`model.transformer_impl` picks the layer specs: "local" or "transformer_engine" (where
    Transformer Engine imports, which needs CUDA)."""
    if value not in BACKENDS:
        return f"must be one of {BACKENDS} (the layer-spec backends of SpiralGPTModel)"
    if value == "transformer_engine" and not have_transformer_engine():
        return "Transformer Engine is not importable here (it needs CUDA); use 'local'"
    return None
