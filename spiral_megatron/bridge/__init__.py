"""SpiralFormer in Megatron-Bridge (docs/BRIDGE.md): the model provider, recipes, the
forward step, and the bridge that converts SpiralForCausalLM folders through AutoBridge.

Importing this package imports Megatron-Bridge (20-30 s) and registers the bridge for the
architecture `tools/convert_to_hf.py` writes, as Bridge's own model modules register theirs.
`import spiral_megatron` alone imports nothing of Bridge. Where CUDA is absent the CPU shim
(`cpu.py`) is enabled first; on a GPU machine it does nothing.
"""

from spiral_megatron.bridge import cpu

cpu.enable()

from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix  # noqa: E402

register_allowed_target_prefix("spiral_megatron.")  # `_target_`/`_builder_` names in saved run configs

from spiral_megatron.bridge.conversion import SpiralBridge  # noqa: E402
from spiral_megatron.bridge.provider import SpiralModelProvider, SpiralTransformerConfig  # noqa: E402
from spiral_megatron.bridge.recipes import pretrain_config  # noqa: E402
from spiral_megatron.bridge.step import forward_step  # noqa: E402

__all__ = ["SpiralBridge", "SpiralModelProvider", "SpiralTransformerConfig", "forward_step", "pretrain_config"]
