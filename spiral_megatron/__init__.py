"""spiral_megatron: SpiralFormer (arXiv 2602.11698) on Megatron-Core. See docs/MODEL.md and README.

`SpiralConfig`, `SpiralGPTModel` and `flavors` are imported on first use, so that pure-Python
parts (`config.schedule`, `config.flops`, the Hugging Face files in `hf/`) load without importing
Megatron. docs/ARCHITECTURE.md draws the sub-packages and the one direction of their imports.
"""

__all__ = ["SpiralConfig", "SpiralGPTModel", "flavors"]


def __getattr__(name):
    if name == "SpiralConfig":
        from spiral_megatron.config.spiral_config import SpiralConfig

        return SpiralConfig
    if name == "SpiralGPTModel":
        from spiral_megatron.model.spiral_gpt_model import SpiralGPTModel

        return SpiralGPTModel
    if name == "flavors":
        from spiral_megatron.config import flavors

        return flavors
    raise AttributeError(f"module 'spiral_megatron' has no attribute {name!r}")
