"""SpiralFormerConfig: the Hugging Face configuration of a SpiralFormer (docs/MODEL.md 1-3).

Shipped inside every converted model folder and loaded with `trust_remote_code=True`, so it
imports nothing but `transformers`. Field names follow Hugging Face where it has one
(`hidden_size`, `intermediate_size`, `num_key_value_heads`, `head_dim`) and the paper where the
concept is SpiralFormer's own (`num_prelude_layers`, `chunk_sizes`, `topology`, ...).
"""

from transformers import PretrainedConfig

try:  # a converted model folder: the copy beside this file
    from . import functional_spiral as F
    from .functional_spiral import SHIFTS  # noqa: F401 (a `from .x import` line: transformers copies x.py)
except ImportError:  # the spiral_megatron package, where it lives one level up
    from spiral_megatron import functional_spiral as F

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "silu", "relu")  # transformers' names
POSITION_EMBEDDINGS = ("rope", "none")


class SpiralFormerConfig(PretrainedConfig):
    """`prelude + core x T + coda`; T = len(chunk_sizes), chunk size g_t per loop iteration."""

    model_type = "spiralformer"

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 64,
        intermediate_size: int = 256,
        num_attention_heads: int = 4,
        num_key_value_heads: int = None,
        head_dim: int = None,
        num_prelude_layers: int = 1,
        num_core_layers: int = 2,
        num_coda_layers: int = 1,
        chunk_sizes=(8, 4, 2, 1),
        chunk_offsets=None,
        downscale: str = "self-aggregation",
        upscale: str = "allocate",
        shift: str = "overlap",
        topology: str = "mesh",
        mesh_slots: int = None,
        latent_positions: str = "chunk-end",
        scale_embeddings: bool = True,
        normalization: str = "LayerNorm",
        layer_norm_eps: float = 1e-5,
        hidden_act: str = "gelu",
        gated_linear_unit: bool = False,
        add_bias_linear: bool = True,
        add_qkv_bias: bool = True,
        qk_layernorm: bool = False,
        position_embedding_type: str = "rope",
        rope_theta: float = 10000.0,
        rotary_percent: float = 1.0,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        embedding_initializer_range: float = None,
        unrolled_output_init: bool = True,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        megatron_vocab_size: int = None,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        bos_token_id: int = None,
        eos_token_id: int = None,
        pad_token_id: int = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.num_prelude_layers = num_prelude_layers
        self.num_core_layers = num_core_layers
        self.num_coda_layers = num_coda_layers
        self.chunk_sizes = [int(g) for g in chunk_sizes]
        self.chunk_offsets = [int(w) for w in chunk_offsets] if chunk_offsets is not None else None
        self.downscale = downscale
        self.upscale = upscale
        self.shift = shift
        self.topology = topology
        self.mesh_slots = mesh_slots if mesh_slots is not None or topology != "mesh" else num_core_layers + 3
        self.latent_positions = latent_positions
        self.scale_embeddings = scale_embeddings  # input embeddings x sqrt(hidden_size)
        self.normalization = normalization
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.gated_linear_unit = gated_linear_unit
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.qk_layernorm = qk_layernorm
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.rotary_percent = rotary_percent
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        # How the Megatron run drew its embeddings and output projections (docs/MODEL.md 1),
        # carried so that the reverse conversion restores the record; the HF model loads weights.
        self.embedding_initializer_range = embedding_initializer_range or initializer_range
        self.unrolled_output_init = unrolled_output_init
        # Training-time dropout of the Megatron run, carried for round trips; the HF model
        # is an inference model and applies none.
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.megatron_vocab_size = megatron_vocab_size  # rows before trimming, for the reverse
        self.use_cache = use_cache
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check(self):
        """Errors name the bad value and the rule (STYLE.md)."""
        for name, allowed in (
            ("downscale", F.DOWNSCALES), ("upscale", F.UPSCALES), ("shift", F.SHIFTS),
            ("topology", F.TOPOLOGIES), ("latent_positions", F.LATENT_POSITIONS),
            ("normalization", NORMALIZATIONS), ("hidden_act", ACTIVATIONS),
            ("position_embedding_type", POSITION_EMBEDDINGS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} must be one of {allowed}")
        if self.num_core_layers > 0 and not self.chunk_sizes:
            raise ValueError(f"chunk_sizes {self.chunk_sizes} is empty but num_core_layers is {self.num_core_layers}")
        if self.num_core_layers == 0 and self.chunk_sizes:
            raise ValueError(f"chunk_sizes {self.chunk_sizes} needs num_core_layers >= 1, got 0")
        F.check_schedule(self.chunk_sizes, self.chunk_offsets, self.shift)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.topology == "mesh" and self.mesh_slots < 2:
            raise ValueError(f"mesh_slots {self.mesh_slots} must be >= 2")

    @property
    def offsets(self):
        """w_t per iteration (default all 0)."""
        return list(self.chunk_offsets) if self.chunk_offsets is not None else [0] * len(self.chunk_sizes)

    @property
    def shifts(self):
        """s_t per iteration: g - 1 ("overlap", paper) or g ("no-overlap")."""
        return [F.shift_of(g, self.shift) for g in self.chunk_sizes]
