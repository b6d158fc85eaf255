"""The resume check's line for a changed activation: the hint about Megatron's fused bias-GeLU
(the tanh approximation) where GeLU meets its tanh approximation, and only there (a SwiGLU
checkpoint resumed without --swiglu got the GeLU hint)."""

import pytest

from spiral_megatron.job.checkpoint.resume_check import architecture_differences
from spiral_megatron.model.model_args import ModelArgs


@pytest.mark.parametrize("saved, new, hinted", [("gelu_tanh", "gelu", True), ("gelu", "gelu_tanh", True),
                                                ("silu", "gelu", False), ("gelu", "relu", False)])
def test_the_bias_gelu_hint_only_between_gelu_and_its_tanh_approximation(saved, new, hinted):
    diffs = architecture_differences(ModelArgs(config={"activation_func_name": saved}),
                                     ModelArgs(config={"activation_func_name": new}), weights_only=False)
    assert diffs[0].startswith(f"model.activation_func_name {saved!r} -> {new!r}")
    assert ("bias_activation_fusion" in diffs[0]) == hinted
