"""No setting is silently dropped: every SpiralConfig field a user can set as `--model.<field>`
reaches the config the job builds the model with, or is refused before compute naming it."""

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
import torch.nn.functional as F

from spiral_megatron.config.spiral_config import SpiralConfig
from spiral_megatron.job.settings.config import ConfigError
from spiral_megatron.job.settings.resolve import resolve

DEBUG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "debug-cpu.yaml"
HINTS = typing.get_type_hints(SpiralConfig)
FIELDS = {f.name: f for f in dataclasses.fields(SpiralConfig)}


def _default(name):
    f = FIELDS[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def candidate(name):
    """A non-default value of the field's type, as a user would write it on the command line
    (None where the type holds no YAML value: callables, dtypes, objects)."""
    tp, default = HINTS[name], _default(name)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "false" if default else "true"
    if tp is int:
        return str((default or 0) + 1)
    if tp is float:
        return str((default or 0.25) / 2)
    if origin is typing.Literal:
        return next(str(a) for a in args if a != default)
    if tp is str:
        return "x"
    if origin in (list, tuple) and args and args[0] in (int, str):
        return "[1, 2]" if args[0] is int else "[x]"
    return None


def _same(built, wanted: str) -> bool:
    value = yaml.safe_load(wanted)
    if isinstance(value, str) and isinstance(built, float):
        value = float(value)  # YAML reads 5e-06 as text; the job types it by the field (issue 16)
    if isinstance(built, (list, tuple)):
        return list(built) == list(value)
    if isinstance(built, (int, float)) and not isinstance(built, bool) and not isinstance(value, bool):
        return built == value
    return built == value or str(built) == str(value)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_field_reaches_the_model_or_is_refused(name):
    value = candidate(name)
    argv = [f"--model.{name}", value if value is not None else "something"]
    try:
        job = resolve(argv, DEBUG, on_cpu=True)
    except ConfigError as e:
        assert f"model.{name}" in str(e) or f"'{name}'" in str(e), f"refusal does not name {name}: {e}"
        return
    assert value is not None, f"model.{name} (a Python object) was accepted from the command line"
    built = job.model
    assert _same(getattr(built, name), value), (
        f"model.{name} {value!r} was accepted but the built model has {getattr(built, name)!r}")


def test_the_issue_examples_reach_the_model():
    built = resolve(["--model.recompute_granularity", "selective", "--model.bias_activation_fusion", "true"], DEBUG,
                    on_cpu=True).model
    assert built.recompute_granularity == "selective" and built.bias_activation_fusion is True
    job = resolve(["--model.activation_func", "silu", "--model.gated_linear_unit", "true"], DEBUG, on_cpu=True)
    assert job.model.activation_func is F.silu


@pytest.mark.parametrize("argv, message", [
    (["--model.tensor_model_parallel_size", "2"], "set it with the job key 'tensor_parallel'"),
    (["--model.bf16", "true"], "set it with the job key 'precision'"),
    (["--model.num_moe_experts", "8"], "mixture of experts"),
    (["--model.moe_router_topk", "1"], "mixture of experts"),
    (["--model.context_parallel_size", "2"], "use sequence parallelism"),
    (["--model.init_method", "normal"], "a Python object"),
    (["--model.recompute_granularity", "full"], 'recompute_method must be "block" or "uniform"'),
    (["--model.activation_func", "tanh"], "must be one of ('gelu', 'silu', 'relu')"),
])
def test_refusals_name_the_field_and_why(argv, message):
    with pytest.raises(ConfigError, match=None) as e:
        resolve(argv, DEBUG)
    assert message in str(e.value)


def test_model_fields_are_typed_once_at_load():
    """YAML reads `1e-6` as text; the resolved config holds the field's type (issue 16)."""
    cfg = resolve(["--model.layernorm_epsilon", "1e-6", "--model.qk_layernorm", "yes"], DEBUG).keys
    assert cfg.model["layernorm_epsilon"] == 1e-6 and cfg.model["qk_layernorm"] is True
    assert "layernorm_epsilon: 1.0e-06" in cfg.to_yaml()
    with pytest.raises(ConfigError, match="model.layernorm_epsilon 'small' is refused: not a float"):
        resolve(["--model.layernorm_epsilon", "small"], DEBUG)


def test_fusions_off_on_cpu_and_user_wins():
    built = resolve(["--model.bias_dropout_fusion", "true"], DEBUG, on_cpu=True).model
    assert built.bias_dropout_fusion is True and built.masked_softmax_fusion is False


@pytest.mark.parametrize("argv", [["--model.attention_backend", "flash"], ["--attention-backend", "flash"]])
def test_attention_backend_reaches_the_model_by_name(argv):
    from megatron.core.transformer.enums import AttnBackend

    assert resolve(argv, DEBUG, on_cpu=True).model.attention_backend == AttnBackend.flash
    assert resolve([], DEBUG, on_cpu=True).model.attention_backend == AttnBackend.auto
    with pytest.raises(ConfigError, match=r"model.attention_backend 'sdpa' is refused: must be one of "
                                          r"\('flash', 'fused', 'unfused', 'local', 'auto'\)"):
        resolve(["--attention-backend", "sdpa"], DEBUG)
