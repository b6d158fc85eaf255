"""The local backend's LayerNorm/RMSNorm, usable under sequence parallelism.

Megatron's `WrappedTorchNorm` (its local norm when apex is absent) refuses sequence
parallelism only because it cannot mark its parameters; marking them `sequence_parallel`
is all Megatron needs to sum their gradients over the TP group (docs/MEGATRON-ON-CPU.md).
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from spiral_megatron.errors import ConfigError


class TorchNorm:
    """Builds torch's LayerNorm or RMSNorm (by `config.normalization`), SP-aware."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.layernorm_zero_centered_gamma:
            raise ConfigError("layernorm_zero_centered_gamma True (--apply-layernorm-1p) needs Transformer Engine's "
                              "norms: the local spec's torch norms have no zero-centred gamma")
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ConfigError(f"normalization {config.normalization!r} must be one of {list(norms)}")
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        norm = norms[config.normalization](hidden_size, eps=eps, device=device, dtype=config.params_dtype)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm
