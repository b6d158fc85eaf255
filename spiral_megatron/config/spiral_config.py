"""SpiralConfig: Megatron's TransformerConfig plus SpiralFormer's own fields (docs/MODEL.md 1-3)."""

import copy
from dataclasses import dataclass, field
from typing import Optional, Tuple

from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import scaled_init_method_normal

from spiral_megatron.config import schedule
from spiral_megatron.config.fields import FUNCTION, RUNTIME, kind
from spiral_megatron.functional_spiral import DOWNSCALES, LATENT_POSITIONS, TOPOLOGIES, UPSCALES
from spiral_megatron.errors import ConfigError


@dataclass
class SpiralConfig(TransformerConfig):
    """A SpiralFormer `prelude + core x T + coda`. `num_layers` is derived (unique layers).

    Each field below says its class (spiral_megatron/config/fields.py): FUNCTION fields change what
    the model computes and are recorded, RUNTIME fields only how it runs."""

    num_prelude_layers: int = field(default=0, metadata=kind(FUNCTION))
    """N_pre: unshared layers before the loop, at full resolution."""

    num_core_layers: int = field(default=0, metadata=kind(FUNCTION))
    """N_loop: the shared layers ("core") the loop runs T times."""

    num_coda_layers: int = field(default=0, metadata=kind(FUNCTION))
    """N_post: unshared layers after the loop, at full resolution."""

    chunk_sizes: Tuple[int, ...] = field(default=(), metadata=kind(FUNCTION))
    """g_t per loop iteration, e.g. (8, 4, 2, 1); T = len(chunk_sizes); () = no loop."""

    chunk_offsets: Optional[Tuple[int, ...]] = field(default=None, metadata=kind(FUNCTION))
    """w_t per iteration, each in [0, g_t); None = all 0 [ours: default]."""

    downscale: str = field(default="self-aggregation", metadata=kind(FUNCTION))
    """Tokens -> latent per chunk: "self-aggregation" (paper) or "mean"."""

    upscale: str = field(default="allocate", metadata=kind(FUNCTION))
    """Latent update -> tokens: "allocate" (learned, paper) or "repeat"."""

    shift: str = field(default="overlap", metadata=kind(FUNCTION))
    """Causal right shift: "overlap" s = g - 1 (paper) or "no-overlap" s = g."""

    topology: str = field(default="mesh", metadata=kind(FUNCTION))
    """How an update merges into the state: "mesh" (the paper's), "anchor" or "residual" [ours]."""

    mesh_slots: Optional[int] = field(default=None, metadata=kind(FUNCTION))
    """B, MeSH buffer slots; None = num_core_layers + 3. Only with topology "mesh"."""

    latent_positions: str = field(default="chunk-end", metadata=kind(FUNCTION))
    """Rotary position of latent j: "chunk-end" (its last token, [ours]) or "index" (j)."""

    scale_embeddings: bool = field(default=True, metadata=kind(FUNCTION))
    """Multiply the input embeddings by sqrt(hidden_size) (MeSH appendix B, Pythia)."""

    unrolled_output_init: bool = field(default=True, metadata=kind(FUNCTION))
    """Output-projection init std / sqrt(2 N_compute), N_compute the UNROLLED depth (MeSH app. B)."""

    loop_placement: str = field(default="across", metadata=kind(RUNTIME))
    """Pipeline: "across" (iterations spread over stages by cost) or "one-stage" (whole loop)."""

    pipeline_split: Optional[Tuple[int, ...]] = field(default=None, metadata=kind(RUNTIME))
    """Pipeline: units of work per stage (see pipeline_plan.py); None = cost-balanced."""

    recompute_loop_iterations: bool = field(default=False, metadata=kind(RUNTIME))
    """Recompute each loop iteration (resampling + core) in backward, keeping only its input:
    the loop keeps one state per iteration instead of every core layer's activations
    (Megatron's recompute_* options still apply inside)."""

    compile_loop_iteration: bool = field(default=False, metadata=kind(RUNTIME))
    """Run each loop iteration (resampling, core, topology write) through `torch.compile`: one
    compiled graph per level instead of hundreds of eager ops (issue 15; CPU and GPU)."""

    compile_layers: bool = field(default=False, metadata=kind(RUNTIME))
    """Run each prelude and coda TransformerLayer through `torch.compile` (regional compilation,
    as torchtitan does: one region per layer, the same graph reused by every layer). Together
    with compile_loop_iteration nothing of a step's layers stays eager. Runtime: same function."""

    def __post_init__(self):
        self._derive_spiral_fields()
        super().__post_init__()
        self._check_after_megatron()

    def _derive_spiral_fields(self):
        """SpiralFormer's checks and derived fields, before Megatron's own `__post_init__`
        (which reads `num_layers` and `output_layer_init_method`). Idempotent."""
        self._check_spiral_fields()
        self.chunk_sizes = schedule.parse_chunk_sizes(self.chunk_sizes)
        if self.chunk_offsets is not None:
            self.chunk_offsets = schedule.parse_ints(self.chunk_offsets, "chunk_offsets")
        schedule.make_levels(self.chunk_sizes, self.chunk_offsets, self.shift)
        if self.topology == "mesh" and self.mesh_slots is None:
            self.mesh_slots = self.num_core_layers + 3
        unique = self.num_prelude_layers + self.num_core_layers + self.num_coda_layers
        if self.num_layers not in (0, unique):
            raise ConfigError(
                f"num_layers {self.num_layers} must equal num_prelude_layers + num_core_layers + "
                f"num_coda_layers = {unique} (or be left 0)"
            )
        self.num_layers = unique
        if self.pipeline_split is not None:
            self.pipeline_split = schedule.parse_ints(self.pipeline_split, "pipeline_split")
        if self.unrolled_output_init and self.output_layer_init_method is None:
            # Megatron scales by the unique layers (num_layers); the residual stream of a looped
            # model sums one output projection per UNROLLED layer (MeSH appendix B).
            self.output_layer_init_method = scaled_init_method_normal(self.init_method_std, self.num_compute_layers)

    def _check_after_megatron(self):
        """The parallel-layout checks, after Megatron's `__post_init__` derived its fields."""
        self._check_parallel_layout()
        self._check_recompute()
        if self.pipeline_model_parallel_size > 1 and self.chunk_sizes:
            # Pipeline messages change shape inside and around the loop (a packed loop state
            # is k x the padded sequence): let Megatron's p2p exchange shapes first.
            self.variable_seq_lengths = True

    def _check_parallel_layout(self):
        if self.virtual_pipeline_model_parallel_size is not None:
            raise ConfigError(
                f"virtual_pipeline_model_parallel_size {self.virtual_pipeline_model_parallel_size}: "
                f"the interleaved pipeline schedule is not supported by SpiralGPTModel; leave it None"
            )
        if self.context_parallel_size > 1 and self.chunk_sizes:
            raise ConfigError(
                f"context_parallel_size {self.context_parallel_size} is not supported with a loop "
                f"(chunk_sizes {self.chunk_sizes}); use sequence parallelism"
            )
        if self.loop_placement not in ("across", "one-stage"):
            raise ConfigError(f"loop_placement {self.loop_placement!r} must be one of ('across', 'one-stage')")

    def _check_recompute(self):
        """Two of Megatron's selective recompute modules that fail in megatron-core 0.16.1 and
        0.19.2 (a plain GPTModel too), refused before they hang or crash a step."""
        if self.recompute_granularity != "selective":
            return
        from megatron.core.tensor_parallel import random as mcore_random

        if "mlp" in self.recompute_modules and self.add_bias_linear:
            # The MLP returns its linear_fc2 bias parameter out of the checkpoint; autograd gives
            # a Function's outputs their grad_fn in place, so the parameter stops being a leaf
            # and the checkpoint's backward re-enters itself without end.
            raise ValueError(
                "recompute_modules 'mlp' with add_bias_linear true never finishes a backward "
                "(Megatron's MLP recompute turns the linear_fc2 bias into a non-leaf); drop 'mlp' "
                "or set add_bias_linear false"
            )
        if "layernorm" in self.recompute_modules and not mcore_random.HAVE_TE:
            # CheckpointWithoutOutput() sets fp8 = (False is not None) and calls TE's
            # FP8GlobalStateManager, a NameError without Transformer Engine.
            raise ValueError(
                "recompute_modules 'layernorm' needs Transformer Engine (Megatron's "
                "CheckpointWithoutOutput calls it even without fp8), which is not importable here"
            )

    def _check_spiral_fields(self):
        for name in ("num_prelude_layers", "num_core_layers", "num_coda_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} {getattr(self, name)} must be >= 0")
        if self.num_prelude_layers + self.num_core_layers + self.num_coda_layers < 1:
            raise ConfigError("a model needs at least one layer (prelude, core or coda)")
        sizes = schedule.parse_chunk_sizes(self.chunk_sizes)
        if self.num_core_layers > 0 and not sizes:
            raise ConfigError(
                f"chunk_sizes {self.chunk_sizes!r} is an empty schedule but num_core_layers is "
                f"{self.num_core_layers}: give one chunk size per loop iteration"
            )
        if self.num_core_layers == 0 and sizes:
            raise ConfigError(f"chunk_sizes {sizes} needs num_core_layers >= 1, got 0")
        for name, allowed in (
            ("downscale", DOWNSCALES),
            ("upscale", UPSCALES),
            ("topology", TOPOLOGIES),
            ("latent_positions", LATENT_POSITIONS),
            ("shift", schedule.SHIFTS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r} must be one of {allowed}")
        if self.mesh_slots is not None:
            if self.topology != "mesh":
                raise ConfigError(f"mesh_slots {self.mesh_slots} is only used with topology 'mesh'")
            if self.mesh_slots < 2:
                raise ConfigError(f"mesh_slots {self.mesh_slots} must be >= 2")

    @property
    def levels(self) -> Tuple[schedule.Level, ...]:
        """The loop's resolution schedule, one Level per iteration."""
        return schedule.make_levels(self.chunk_sizes, self.chunk_offsets, self.shift)

    @property
    def num_compute_layers(self) -> int:
        """N_compute = N_pre + N_loop * T + N_post: the layers of the unrolled graph."""
        return self.num_prelude_layers + self.num_core_layers * len(self.chunk_sizes) + self.num_coda_layers

    @property
    def num_loops(self) -> int:
        """T, the number of loop iterations."""
        return len(self.chunk_sizes)


def block_config(config: TransformerConfig, num_layers: int) -> TransformerConfig:
    """A copy of `config` for one TransformerBlock of `num_layers` layers (prelude, core, coda).

    Each part numbers its layers from 1 and is one pipeline stage's own business, so its
    checkpoint keys (`prelude.layers.i`, `core.layers.i`) do not depend on the layout.
    """
    part = copy.copy(config)
    part.num_layers = num_layers
    part.pipeline_model_parallel_size = 1
    part.virtual_pipeline_model_parallel_size = None
    part.num_layers_in_first_pipeline_stage = None
    part.num_layers_in_last_pipeline_stage = None
    part.pipeline_model_parallel_layout = None
    return part
