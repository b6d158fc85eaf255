"""The Hugging Face files shipped with every converted model (plain torch + transformers only).

`configuration_spiral.py`, `functional_spiral.py` (the loop's math, which the Megatron model
imports too), `layers_spiral.py`, `loop_spiral.py` and `modeling_spiral.py` are copied into the
model folder and loaded with `trust_remote_code=True`; see MODEL_FILES.
"""

MODEL_FILES = ("configuration_spiral.py", "functional_spiral.py", "layers_spiral.py", "loop_spiral.py",
               "modeling_spiral.py")
