"""spiral_megatron: SpiralFormer (arXiv 2602.11698) on Megatron-Core. See SPEC.md and README."""

from spiral_megatron.config import SpiralConfig
from spiral_megatron.model import SpiralGPTModel

__all__ = ["SpiralConfig", "SpiralGPTModel"]
