"""The job's one SpiralConfig: flavor, then Megatron-LM's fusion defaults, then every
`model.<field>` the user set, then what the job's keys decide (docs/CONFIG.md).

Built once per job, by resolve.py. Megatron's own validation of the combination
(TransformerConfig.__post_init__) refuses settings with a ValueError or an assert: those become
one-line ConfigErrors here; any other exception is a bug and keeps its traceback.
"""

import traceback
from pathlib import PurePath
from typing import Any, Dict

import torch

from spiral_megatron.config.flavors import Flavor
from spiral_megatron.config.spiral_config import SpiralConfig
from spiral_megatron.model.layer_specs import have_transformer_engine
from spiral_megatron.job.settings.keys import ConfigError, TrainingConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The files of megatron-core whose raise/assert statements validate a TransformerConfig.
MEGATRON_VALIDATION = (("megatron", "core", "transformer", "transformer_config.py"),
                       ("megatron", "core", "model_parallel_config.py"))


def backend(cfg: TrainingConfig, on_cpu: bool) -> str:
    """The layer-spec backend: `model.transformer_impl` when set (Megatron-LM's
    --transformer-impl), else Transformer Engine on GPUs where importable, else local."""
    chosen = cfg.model.get("transformer_impl")
    if chosen is not None:
        return chosen
    return "transformer_engine" if not on_cpu and have_transformer_engine() else "local"


def job_fields(cfg: TrainingConfig, on_cpu: bool, backend_name: str) -> Dict[str, Any]:
    """The SpiralConfig fields the job's own keys decide (model_fields.JOB_FIELDS)."""
    dtype = DTYPES[cfg.precision]
    fields = dict(
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        sequence_parallel=cfg.sequence_parallel,
        use_cpu_initialization=on_cpu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        transformer_impl=backend_name,
    )
    if cfg.fp8 is not None:
        fields.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe)
    return fields


def build(cfg: TrainingConfig, flavor: Flavor, fusions: Dict[str, bool], overrides: Dict[str, Any],
          job: Dict[str, Any]) -> SpiralConfig:
    """SpiralConfig(flavor's fields | fusion defaults | the user's `model.<field>` | the job's)."""
    try:
        return SpiralConfig(**{**flavor.model, **fusions, **overrides, **job})
    except (ValueError, AssertionError) as e:
        if not isinstance(e, ConfigError) and not refused_by_megatron(e):
            raise  # not a refusal: a bug, ours or Megatron's
        reason = " ".join(str(e).split()) or traceback.extract_tb(e.__traceback__)[-1].line
        raise ConfigError(f"model {cfg.model!r} with tensor_parallel {cfg.tensor_parallel}, pipeline_parallel "
                          f"{cfg.pipeline_parallel}, precision {cfg.precision!r}: {reason}") from None


def refused_by_megatron(error: BaseException) -> bool:
    """True when `error` was raised by a statement of megatron-core's config validation
    (MEGATRON_VALIDATION), i.e. Megatron refuses the settings; False for anything raised deeper."""
    frames = traceback.extract_tb(error.__traceback__)
    parts = PurePath(frames[-1].filename).parts if frames else ()
    return any(parts[-len(path):] == path for path in MEGATRON_VALIDATION)
