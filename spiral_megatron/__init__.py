"""spiral_megatron: SpiralFormer (arXiv 2602.11698) on Megatron-Core. See docs/MODEL.md and README.

`SpiralConfig` and `SpiralGPTModel` are imported on first use, so that pure-Python parts
(`schedule`, `flops`, the Hugging Face files in `hf/`) load without importing Megatron.
"""

__all__ = ["SpiralConfig", "SpiralGPTModel"]


def __getattr__(name):
    if name == "SpiralConfig":
        from spiral_megatron.config import SpiralConfig

        return SpiralConfig
    if name == "SpiralGPTModel":
        from spiral_megatron.model import SpiralGPTModel

        return SpiralGPTModel
    raise AttributeError(f"module 'spiral_megatron' has no attribute {name!r}")
