"""One converted folder for the tests of the HF model's transformers API (generate, Trainer, peft).

The folder is what the converter writes (`hf_io.write_hf_folder`: config, the model files, the
tokenizer, safetensors) for a small SpiralFormer with random weights of std 0.3: large enough
that beams and assistants disagree (the tests assert it), where a trained or 0.02-init model's
would collapse. No Megatron is needed; tests/hf/test_convert.py covers the conversion itself.
"""

import pytest
import torch

from tests.hf import helpers as H

CONFIG = dict(vocab_size=H.VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, chunk_sizes=[4, 2, 1],
              chunk_offsets=[1, 1, 0], topology="mesh", max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
STD = 0.3


def randomize(model, seed: int, std: float = STD):
    """Weights N(0, std^2), norms' weights 1 + N(0, std^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    from spiral_megatron.conversion import hf_config, hf_io
    from spiral_megatron.hf.configuration_spiral import SpiralFormerConfig
    from spiral_megatron.hf.modeling_spiral import SpiralForCausalLM

    root = tmp_path_factory.mktemp("hf_api")
    H.write_tokenizer(root / "tokenizer")
    config = SpiralFormerConfig(**CONFIG, architectures=["SpiralForCausalLM"])
    config.auto_map = dict(hf_config.AUTO_MAP)
    model = randomize(SpiralForCausalLM(config), seed=1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return hf_io.write_hf_folder(root / "model", config, state, root / "tokenizer")


def load(folder, **kwargs):
    """The folder's model through AutoModelForCausalLM, with the code the folder ships."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32,
                                                **kwargs).eval()


@pytest.fixture(scope="module")
def model(folder):
    return load(folder)
