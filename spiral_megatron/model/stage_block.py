"""StageBlock: a TransformerBlock holding layers [first, first + n) of a part (prelude, coda).

Megatron numbers a block's checkpoint keys by its own pipeline offsets, which know nothing
of our partition. A StageBlock writes each layer under its index in the whole part,
`prelude.layers.<global index>.*`, so a checkpoint is the same whatever the layout and can be
loaded at any other one (one key per layer: Megatron's "non-homogeneous" form).
"""

import re

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import dict_list_map_inplace
from megatron.core.transformer.transformer_block import TransformerBlock

from spiral_megatron.model import compilation


class StageBlock(TransformerBlock):
    """TransformerBlock whose layer i is layer `first_layer + i` of its part."""

    def __init__(self, *args, first_layer: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_layer = first_layer

    def forward(self, *args, **kwargs):
        with compilation.tracing(self.config.compile_layers):  # its layers are compiled regions
            return super().forward(*args, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict = None):
        metadata = dict(metadata or {}, non_homogeneous_layers=True)
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        local = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.")

        def renumber(x):
            if isinstance(x, (ShardedTensor, ShardedObject, ShardedTensorFactory)):
                x.key = local.sub(lambda m: f"{prefix}layers.{self.first_layer + int(m.group(1))}.", x.key, count=1)
            return x

        dict_list_map_inplace(renumber, state)
        return state
