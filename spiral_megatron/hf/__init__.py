"""The Hugging Face files shipped with every converted model (plain torch + transformers only).

`configuration_spiral.py`, `cache_spiral.py`, `layers_spiral.py`, `loop_spiral.py`,
`padding_spiral.py`, `modeling_spiral.py` and `classification_spiral.py` here, and
`spiral_megatron/functional_spiral.py` (the loop's math, which the Megatron model imports too)
with `functional_autograd.py` (its written-out backwards), are copied side by side into the
model folder and loaded with `trust_remote_code=True`; see `model_files`. Beside each other
they import the math relatively; inside this package, from `spiral_megatron.functional_spiral`.
"""

from pathlib import Path
from typing import Tuple

MODEL_FILES = ("configuration_spiral.py", "cache_spiral.py", "layers_spiral.py", "loop_spiral.py", "padding_spiral.py",
               "modeling_spiral.py", "classification_spiral.py", "../functional_spiral.py", "../functional_autograd.py")


def model_files() -> Tuple[Path, ...]:
    """The files a converted folder holds, as paths in this installation (copy by `.name`)."""
    here = Path(__file__).resolve().parent
    return tuple((here / name).resolve() for name in MODEL_FILES)
