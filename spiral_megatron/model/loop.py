"""SpiralLoop: the shared core run T times, coarse to fine (docs/MODEL.md sections 2-3).

One iteration t, chunk size g, offset w, shift s, on the token states h [s, b, h]:
    x = shift_right(h, w)                  chunk j of x = tokens [j*g - w, j*g + g - 1 - w]
    z = downscale_t(x)                     [s/g, b, h]  one latent per chunk
    y = core(z)                            [s/g, b, h]  causal over latents, shared weights
    u = upscale_t(y, y - z)                [s, b, h]    the core's update, back on tokens
    u = shift_right(u, s - w)              a token sees only chunks that closed at or before it
    state = topology.write(state, u, t)
Chunk sizes of 1 skip the resampling (an identity) and build no parameters for it. The
iteration and the math of each step are `functional_spiral.py`, shared with the Hugging Face
model; what stays here is Megatron's: the core block, masks and rotary slices per level, the
shift across sequence-parallel ranks, recompute and the opt-in `torch.compile`.
"""

import contextlib

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

from spiral_megatron import functional_spiral as F
from spiral_megatron.config.spiral_config import SpiralConfig, block_config
from spiral_megatron.model import compilation
from spiral_megatron.model.layer_specs import SpiralLoopSubmodules
from spiral_megatron.model.resampling import shift_right


def causal_mask(n: int, device) -> torch.Tensor:
    """[1, 1, n, n] bool, True above the diagonal (Megatron's convention: True = masked)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)[None, None]


def select_level(quantizers, t: int):
    """Level t on the core's per-level quantizers (quantization/levels.py), now and in the
    backward: a context for iteration t's forward.

    Megatron's recompute (selective `recompute_modules`, or `full`) re-runs core modules in the
    backward, long after the loop moved on to other levels. Every tensor that iteration t saves
    for backward is packed with t, and unpacking it selects level t again; a recompute unpacks
    its saved inputs before it re-runs them (tensor_parallel.CheckpointFunction.backward), so it
    replays with its own level's scales, at any pipeline schedule's order.
    """
    for q in quantizers:
        q.level = t
    if not quantizers or not torch.is_grad_enabled():
        return contextlib.nullcontext()

    def unpack(saved):
        level, tensor = saved
        if quantizers[0].level != level:  # they always move together
            for q in quantizers:
                q.level = level
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(lambda tensor: (t, tensor), unpack)


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
        self._masks = {}  # causal masks by (latent length, device)
        self._ropes = {}  # latent rotary views by position slice: (token table, view)
        # compile_loop_iteration: (step, iteration, write) compiled; dynamo specialises each
        # graph on the level t, so every level gets its own.
        self._compiled = (tuple(compilation.compiled(fn) for fn in (self.step, self.iteration, self.topology.write))
                          if config.compile_loop_iteration else None)
        self.level_quantizers = []  # set by quantization/levels.py: the core's per-level scales

    def forward(self, state, rotary_pos_emb=None, use_mask: bool = False):
        """Run this stage's iterations on the loop state (see topology.py).

        The state's tensors are [S, b, h] (S = this rank's slice under SP, a multiple of every
        chunk size). rotary_pos_emb: [>= S_global, 1, 1, d] token-position freqs or None.
        use_mask: pass explicit causal masks to the core (else Megatron's causal default).
        """
        step, iteration, write = self._compiled or (self.step, self.iteration, self.topology.write)
        for t in self.iterations:
            if self.config.recompute_loop_iterations and self.training:
                # Megatron's activation checkpoint (restores the RNG states for dropout).
                u = tensor_parallel.checkpoint(lambda h, rope, t=t: iteration(t, h, rope, use_mask), False,
                                               self.topology.read(state), rotary_pos_emb)
                state = write(state, u, t)
            else:
                state = step(t, state, rotary_pos_emb, use_mask)
        return state

    def modules_in_forward_order(self) -> list:
        """The loop's modules in the order `forward` first calls them: the topology's start
        (MeSH's transitional routers, where iteration 0 runs here), then per iteration the
        down-scale, the core, the up-scale and the topology's routers."""
        modules = self.topology.modules_of_init() if 0 in self.iterations else []
        for t in self.iterations:
            key = str(t)
            modules += [self.downscale[key]] if key in self.downscale else []
            modules.append(self.core)
            modules += [self.upscale[key]] if key in self.upscale else []
            modules += self.topology.modules_of(t)
        return modules

    def step(self, t: int, state, rotary_pos_emb, use_mask: bool):
        """Iteration t and its topology write: the loop state after iteration t."""
        u = self.iteration(t, self.topology.read(state), rotary_pos_emb, use_mask)
        return self.topology.write(state, u, t)

    def iteration(self, t: int, h: torch.Tensor, rotary_pos_emb, use_mask: bool) -> torch.Tensor:
        """The token-level update u [s, b, h] of iteration t, shifted (functional_spiral.iteration)."""
        level, key = self.levels[t], str(t)
        sp_group = self.tp_group if self.config.sequence_parallel and self.tp_group.size() > 1 else None
        first_rank = sp_group is None or sp_group.rank() == 0
        with select_level(self.level_quantizers, t):  # per-level activation scales (quantization/levels.py)
            return F.iteration(
                h, level.chunk_size, level.offset, level.shift, dim=0,
                core=lambda z: self._core(z, level, rotary_pos_emb, use_mask, sp_group),
                downscale=lambda chunks, pad: self.downscale[key](chunks, num_pad=pad),
                upscale=lambda y, delta, k: self.upscale[key](y, delta, k),
                first_pad=level.offset if first_rank else 0,
                shift_right_fn=None if sp_group is None else lambda x, k: shift_right(x, k, sp_group),
            )

    def _core(self, z: torch.Tensor, level, rotary_pos_emb, use_mask: bool, sp_group) -> torch.Tensor:
        """The shared core over the latents z [s/g, b, h] of one level."""
        n = z.shape[0] * (sp_group.size() if sp_group is not None else 1)  # global latents
        rope = None if rotary_pos_emb is None else self._latent_rope(rotary_pos_emb, n, level)  # [n, 1, 1, d]
        return self.core(z, attention_mask=self._causal_mask(n, z.device) if use_mask else None,
                         rotary_pos_emb=rope)  # [s/g, b, h]

    def _latent_rope(self, rotary_pos_emb: torch.Tensor, n: int, level) -> torch.Tensor:
        """The latents' rotary frequencies: a strided view of the token table at their positions
        (F.latent_slice), made once per table and level (Megatron caches the table per length)."""
        where = F.latent_slice(n, level.chunk_size, level.offset, self.latent_positions)
        if torch.compiler.is_compiling():
            return rotary_pos_emb[where]
        key = (where.start, where.stop, where.step)
        table, view = self._ropes.get(key, (None, None))
        if table is not rotary_pos_emb:
            view = rotary_pos_emb[where]
            self._ropes[key] = (rotary_pos_emb, view)
        return view

    def _causal_mask(self, n: int, device) -> torch.Tensor:
        """`causal_mask(n)`, built once per latent length."""
        key = (n, str(device))
        if key not in self._masks:
            self._masks[key] = causal_mask(n, device)
        return self._masks[key]
