"""Tiny SpiralConfigs for tests: seconds on a CPU, every option reachable."""

import torch

from spiral_megatron import SpiralConfig, SpiralGPTModel

VOCAB = 48


def tiny_config(**overrides) -> SpiralConfig:
    """A 1+1R4+1 model, d=32, 4 heads; fp32, dropout 0, CPU init (layout-independent weights)."""
    fields = dict(
        hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        num_prelude_layers=1, num_core_layers=1, num_coda_layers=1, chunk_sizes=(8, 4, 2, 1),
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
    )
    fields.update(overrides)
    return SpiralConfig(**fields)


def tiny_model(seed: int = 0, randomize_resampling: bool = True, **overrides) -> SpiralGPTModel:
    """A tiny model; resampling weights and biases get noise so that no path is trivially flat."""
    torch.manual_seed(seed)
    model = SpiralGPTModel(tiny_config(**overrides), vocab_size=VOCAB, max_sequence_length=64)
    if randomize_resampling:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".downscale." in name or ".upscale." in name or ".topology." in name:
                    p.normal_(0.0, 0.5)
    return model
