"""One run trained with every FUNCTION field the HF model carries at a non-default value, the
fused bias-GeLU included (issue 16): it converts to HF with logits parity, and a resume that
changes any of those fields is refused naming the field and both values."""

from pathlib import Path

import pytest

from spiral_megatron.job.checkpoint import resume_check
from spiral_megatron.job.settings.resolve import resolve
from tests.integration.conftest import ROOT, TINY, launch

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint

DEBUG = ROOT / "examples" / "configs" / "debug-cpu.yaml"
# field -> a value other than the debug flavor's (and SpiralConfig's) default
FUNCTION_VALUES = {
    "hidden_size": "48", "num_attention_heads": "6", "num_query_groups": "2", "ffn_hidden_size": "96",
    "kv_channels": "12", "normalization": "RMSNorm", "layernorm_epsilon": "1e-6", "gated_linear_unit": "true",
    "add_bias_linear": "false", "add_qkv_bias": "true", "qk_layernorm": "true",
    "bias_activation_fusion": "true",  # GeGLU through Megatron's fused kernel: the tanh approximation
    "hidden_dropout": "0.05", "attention_dropout": "0.05", "init_method_std": "0.03",
    "embedding_init_method_std": "0.04", "num_prelude_layers": "2", "num_core_layers": "1",
    "num_coda_layers": "0", "chunk_sizes": "4,2,1", "chunk_offsets": "1,1,0", "downscale": "mean",
    "upscale": "repeat", "shift": "no-overlap", "mesh_slots": "3", "latent_positions": "index",
    "scale_embeddings": "false", "unrolled_output_init": "false",
}
ARGV = [a for name, value in FUNCTION_VALUES.items() for a in (f"--model.{name}", value)]
# Recorded fields this run leaves at their default, and why.
NOT_VARIED = {
    "activation_func": "the fused GeLU is the case under test (silu/relu: tests/hf/test_parity.py)",
    "topology": "mesh_slots needs the mesh topology (anchor/residual: tests/hf/test_parity.py)",
}


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("function_fields") / "ckpt"
    launch(cache_dir, *TINY, "--train-iters", 2, "--save", save, *ARGV)
    return save


def test_every_carried_function_field_is_varied():
    from spiral_megatron.conversion.hf_config import HF_FIXED
    from spiral_megatron.model.model_args import RECORDED_FIELDS

    varied = set(FUNCTION_VALUES) | set(NOT_VARIED)
    assert set(RECORDED_FIELDS) - {"activation_func_name"} - set(HF_FIXED) <= varied | {"activation_func"}


def test_converts_with_logits_parity(trained, tmp_path):
    import json
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import convert_to_hf

    out = tmp_path / "hf"
    assert convert_to_hf.main(["--load", str(trained), "--out", str(out), "--verify"]) == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf["hidden_act"] == "gelu_pytorch_tanh" and hf["head_dim"] == 12 and hf["normalization"] == "RMSNorm"
    assert hf["scale_embeddings"] is False and hf["unrolled_output_init"] is False


# Where going back to the flavor's value would not fit the other fields: other values.
OTHER_VALUES = {"chunk_sizes": ["8,4,2"], "num_coda_layers": ["1"],
                "gated_linear_unit": ["false", "--model.add_bias_linear", "true"]}  # the fused GeLU needs a bias


def _changed_args(name: str, vocab_size: int):
    """The model_args this run would have with `model.<name>` back at the flavor's value."""
    argv = [a for key, value in FUNCTION_VALUES.items() if key != name and not (
        name == "gated_linear_unit" and key == "add_bias_linear") for a in (f"--model.{key}", value)]
    if name in OTHER_VALUES:
        argv += [f"--model.{name}", *OTHER_VALUES[name]]
    return resolve([*argv, "--tokenizer-vocab-size", str(vocab_size)], DEBUG, on_cpu=True).model_args


@pytest.mark.parametrize("name", sorted(FUNCTION_VALUES))
def test_resume_refuses_a_changed_function_field(trained, name):
    from spiral_megatron.model.model_args import ModelArgs

    folder = trained / "iter_0000002"
    saved = ModelArgs.load(folder / "model_args.json")
    new = _changed_args(name, saved.vocab_size)
    assert new.vocab_size == saved.vocab_size
    with pytest.raises(resume_check.ResumeMismatch) as e:
        resume_check.check_model(Path(folder), saved, new, None, weights_only=False)
    recorded = "activation_func_name" if name == "bias_activation_fusion" else name
    line = str(e.value)
    assert f"model.{recorded} {saved.config[recorded]!r} -> {new.config[recorded]!r}" in line, line
    resume_check.check_model(Path(folder), saved, _changed_args("", saved.vocab_size), None, weights_only=False)
