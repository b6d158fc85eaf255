"""SpiralLoop: the shared core run T times, coarse to fine (docs/MODEL.md sections 2-3).

One iteration t, chunk size g, offset w, shift s, on the token states h [s, b, h]:
    x = shift_right(h, w)                  chunk j of x = tokens [j*g - w, j*g + g - 1 - w]
    z = downscale_t(x)                     [s/g, b, h]  one latent per chunk
    y = core(z)                            [s/g, b, h]  causal over latents, shared weights
    u = upscale_t(y, y - z)                [s, b, h]    the core's update, back on tokens
    u = shift_right(u, s - w)              a token sees only chunks that closed at or before it
    state = topology.write(state, u, t)
Chunk sizes of 1 skip the resampling (an identity) and build no parameters for it. The
math of each step is `hf/functional_spiral.py`, shared with the Hugging Face model.
"""

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

from spiral_megatron.config import SpiralConfig, block_config
from spiral_megatron.hf import functional_spiral
from spiral_megatron.layer_specs import SpiralLoopSubmodules
from spiral_megatron.resampling import shift_right


def causal_mask(n: int, device) -> torch.Tensor:
    """[1, 1, n, n] bool, True above the diagonal (Megatron's convention: True = masked)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)[None, None]


class SpiralLoop(MegatronModule):
    """The looped core with the resampling and topology of iterations `iterations`.

    A pipeline stage builds the iterations it runs (all T without pipelining); the core is
    built once per stage and shared by its iterations.
    """

    def __init__(self, config: SpiralConfig, submodules: SpiralLoopSubmodules, iterations: range = None,
                 pg_collection=None):
        super().__init__(config=config)
        self.levels = config.levels
        self.iterations = iterations if iterations is not None else range(len(self.levels))
        self.latent_positions = config.latent_positions
        layers = [submodules.layer] * config.num_core_layers
        self.core = TransformerBlock(
            config=block_config(config, config.num_core_layers),
            spec=TransformerBlockSubmodules(layer_specs=layers, layer_norm=None),
            post_layer_norm=False,
            pg_collection=pg_collection,
        )
        self.tp_group = self.core.tp_group
        resampled = [t for t in self.iterations if self.levels[t].chunk_size > 1]
        self.downscale = torch.nn.ModuleDict(
            {str(t): build_module(submodules.downscale, config, self.levels[t].chunk_size) for t in resampled}
        )
        self.upscale = torch.nn.ModuleDict(
            {str(t): build_module(submodules.upscale, config, self.levels[t].chunk_size) for t in resampled}
        )
        self.topology = build_module(submodules.topology, config, self.iterations)

    def forward(self, state, rotary_pos_emb=None, use_mask: bool = False):
        """Run this stage's iterations on the loop state (see topology.py).

        The state's tensors are [S, b, h] (S = this rank's slice under SP, a multiple of every
        chunk size). rotary_pos_emb: [>= S_global, 1, 1, d] token-position freqs or None.
        use_mask: pass explicit causal masks to the core (else Megatron's causal default).
        """
        for t in self.iterations:
            h = self.topology.read(state)
            if self.config.recompute_loop_iterations and self.training:
                # Megatron's activation checkpoint (restores the RNG states for dropout).
                u = tensor_parallel.checkpoint(
                    lambda h, rope, t=t: self.iteration(t, h, rope, use_mask), False, h, rotary_pos_emb)
            else:
                u = self.iteration(t, h, rotary_pos_emb, use_mask)
            state = self.topology.write(state, u, t)
        return state

    def iteration(self, t: int, h: torch.Tensor, rotary_pos_emb, use_mask: bool) -> torch.Tensor:
        """The token-level update u [s, b, h] of iteration t."""
        level, key = self.levels[t], str(t)
        sp_group = self.tp_group if self.config.sequence_parallel else None
        first_rank = sp_group is None or sp_group.rank() == 0
        x = shift_right(h, level.offset, sp_group)  # [s, b, h]
        if key in self.downscale:
            z = self.downscale[key](x, num_pad=level.offset if first_rank else 0)  # [s/g, b, h]
        else:
            z = x
        n = z.shape[0] * (sp_group.size() if sp_group is not None else 1)  # global latents
        y = self.core(
            z,
            attention_mask=causal_mask(n, z.device) if use_mask else None,
            rotary_pos_emb=self._latent_rope(rotary_pos_emb, level, n),
        )  # [s/g, b, h]
        u = self.upscale[key](y, y - z) if key in self.upscale else y - z  # [s, b, h]
        return shift_right(u, level.shift - level.offset, sp_group)

    def _latent_rope(self, rotary_pos_emb, level, n: int):
        """Freqs of the n latents: at their chunk's last token (j*g + g - 1 - w) [ours] or j."""
        if rotary_pos_emb is None:
            return None
        j = torch.arange(n, device=rotary_pos_emb.device)
        pos = functional_spiral.latent_positions(j, level.chunk_size, level.offset, self.latent_positions)
        return rotary_pos_emb[pos]  # [n, 1, 1, d]
