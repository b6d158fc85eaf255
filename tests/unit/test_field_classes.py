"""Every megatron-core field is classified on purpose (issue 23): function, runtime or refused,
by name, for the installed release (CI runs 0.19.2; 0.16.1 with PYTHONPATH=.ci-mcore16)."""

import dataclasses

import pytest

from spiral_megatron.config import megatron_fields
from spiral_megatron.config.fields import FUNCTION, REFUSED, RUNTIME, kind_of
from spiral_megatron.config.spiral_config import SpiralConfig


def unclassified():
    """SpiralConfig's fields (TransformerConfig's included) that have no class."""
    return sorted(f.name for f in dataclasses.fields(SpiralConfig) if kind_of(f) is None)


def test_every_field_of_the_installed_megatron_core_is_classified():
    from megatron.core import package_info

    assert unclassified() == [], (
        f"megatron-core {package_info.__version__} has fields nobody classified: read what each does in "
        "megatron-core's source and list it in spiral_megatron/config/megatron_fields.py (docs/CONFIG.md)")


def test_a_field_without_a_class_is_found(monkeypatch):
    monkeypatch.setattr(megatron_fields, "RUNTIME", megatron_fields.RUNTIME - {"recompute_granularity"})
    assert unclassified() == ["recompute_granularity"]


def test_each_field_has_one_class_and_every_refusal_a_reason():
    names = [megatron_fields.FUNCTION, megatron_fields.RUNTIME, set(megatron_fields.REFUSED)]
    assert all(not (a & b) for i, a in enumerate(names) for b in names[i + 1:])
    assert all(reason.strip() for reason in megatron_fields.REFUSED.values())


def test_the_job_sets_runtime_fields_only():
    from spiral_megatron.job.settings.model_fields import JOB_FIELDS

    fields = {f.name: f for f in dataclasses.fields(SpiralConfig)}
    assert {name: kind_of(fields[name]) for name in JOB_FIELDS} == dict.fromkeys(JOB_FIELDS, RUNTIME)


def test_function_fields_are_what_model_args_records():
    from spiral_megatron.model.model_args import ACTIVATION_FIELDS, RECORDED_FIELDS

    function = {f.name for f in dataclasses.fields(SpiralConfig) if kind_of(f) == FUNCTION}
    assert set(RECORDED_FIELDS) == function - set(ACTIVATION_FIELDS) | {"activation_func_name"}


@pytest.mark.parametrize("argv, reason", [
    (["--model.calculate_per_token_loss", "true"], "the job's loss is the mean over each micro-batch's tokens"),
    (["--model.tp_comm_overlap", "true"], "needs Transformer Engine's userbuffers"),
    (["--model.qk_clip", "true"], "Megatron-LM's training loop"),
    (["--model.use_te_rng_tracker", "true"], "not read by megatron.core's layers"),
    (["--model.defer_embedding_wgrad_compute", "true"], "embedding activation buffers"),
])
def test_refused_fields_accepted_before_are_refused_by_name(argv, reason):
    """Fields the job took as runtime before every field was read; each broke or did nothing."""
    from spiral_megatron.job.settings.config import ConfigError
    from spiral_megatron.job.settings.resolve import resolve
    from tests.conftest import ROOT

    name = argv[0][len("--model."):]
    assert kind_of(next(f for f in dataclasses.fields(SpiralConfig) if f.name == name)) == REFUSED
    with pytest.raises(ConfigError) as e:
        resolve(argv, ROOT / "examples" / "configs" / "debug-cpu.yaml")
    assert f"model.{name}" in str(e.value) and reason in str(e.value)
