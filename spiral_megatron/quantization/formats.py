"""The quantization formats: names -> Model Optimizer (modelopt) configs.

The configs are modelopt's own presets (`mtq.*_CFG`): they quantize every Megatron
`ColumnParallelLinear`/`RowParallelLinear` (attention QKV and projection, MLP fc1 and fc2) and
leave the output layer in high precision. One addition [ours]: the local spec's norms are
torch `LayerNorm`s, which modelopt also converts, and the presets' `*input_quantizer` pattern
would then fake-quantize the residual stream entering every norm. No deployment kernel does
that (with Transformer Engine the norm is fused into the next GEMM, whose input is quantized),
and modelopt's plugin does not checkpoint those quantizers: they are disabled. The loop's own small layers (the scorer,
the allocator, the MeSH routers) are `ReplicatedLinear`s, which modelopt does not convert:
they stay in high precision, like the routers modelopt's presets exclude in MoE models.
"""

import copy

# format name -> (modelopt config name, does it quantize activations?)
FORMATS = {
    "fp8": ("FP8_DEFAULT_CFG", True),                # W8A8, FP8 e4m3, per-tensor scales
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", True),       # W8A8 INT8, per-channel weights, SmoothQuant
    "int4_awq": ("INT4_AWQ_CFG", False),             # W4A16 INT4, blocks of 128, AWQ
    "nvfp4": ("NVFP4_DEFAULT_CFG", True),            # W4A4 FP4 e2m1, blocks of 16 (modelopt: CUDA only)
}


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise ValueError(f"unknown quantization format {name!r}; known: {', '.join(FORMATS)}")
    return name


def quant_config(name: str) -> dict:
    """A private copy of modelopt's config for format `name`."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, FORMATS[check_format(name)][0]))
    cfg["quant_cfg"].append({"quantizer_name": "*", "parent_class": "nn.LayerNorm", "enable": False})
    return cfg


def quantizes_activations(name: str) -> bool:
    return FORMATS[check_format(name)][1]
