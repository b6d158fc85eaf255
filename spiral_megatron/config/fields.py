"""What a model setting is, in three classes (docs/CONFIG.md). Data only, no Megatron import.

* FUNCTION: changes what the model computes (architecture, activation and its approximation,
  norms, rotary layout, dropout, initialisation). Recorded in model_args.json, compared on
  resume (a change is refused naming the field), carried to the Hugging Face config or the
  conversion refuses naming the field.
* RUNTIME: numerics and how the job runs: precision, fusions whose math is identical,
  recompute, parallel layout. Free to change between runs.
* REFUSED: features SpiralGPTModel does not build, and fields nothing would read; a value other
  than the default is refused by name with the reason (megatron_fields.REFUSED).

SpiralConfig's own fields say their class where they are declared (`metadata=kind(...)`);
TransformerConfig's fields are declared by Megatron, so each is listed in megatron_fields.py.
"""

import dataclasses
from typing import Dict, Optional

from spiral_megatron.config import megatron_fields

FUNCTION, RUNTIME, REFUSED = "function", "runtime", "refused"


def kind(name: str) -> Dict[str, str]:
    """`dataclasses.field(metadata=kind(FUNCTION))`."""
    return {"kind": name}


def kind_of(field: dataclasses.Field) -> Optional[str]:
    """FUNCTION, RUNTIME or REFUSED for a SpiralConfig field; None for a megatron-core field that
    nobody has classified (tests/unit/test_field_classes.py fails on it, the job refuses it)."""
    if field.metadata.get("kind"):
        return field.metadata["kind"]
    if field.name in megatron_fields.FUNCTION:
        return FUNCTION
    if field.name in megatron_fields.RUNTIME:
        return RUNTIME
    return REFUSED if field.name in megatron_fields.REFUSED else None


def refusal(name: str) -> Optional[str]:
    """Why a value other than the default of REFUSED field `name` is refused."""
    return megatron_fields.REFUSED.get(name)
