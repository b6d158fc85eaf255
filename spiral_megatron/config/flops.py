"""Unique parameters and FLOPs of a SpiralConfig (docs/MODEL.md section 5), in pure Python.

Per layer at sequence n, forward: 2*n*(weights of the projections and MLP) + 4*n^2*d for
attention scores and values (counted in full, as Megatron's MFU convention does; a causal
kernel does half). With 4x MLP and full heads the weights term is docs/MODEL.md's 24*n*d^2.
Forward = (N_pre + N_post) layer(L) + N_loop sum_t layer(L_t) + 2 L d V + resampling terms.
Training = 3 x forward (backward is about twice the forward).
"""

from spiral_megatron.config import schedule


def _layer_weights(c) -> int:
    """Weight entries of one transformer layer's matmuls (QKV, proj, MLP)."""
    d, hd = c.hidden_size, c.kv_channels
    q, kv = c.num_attention_heads * hd, (c.num_query_groups or c.num_attention_heads) * hd
    fc1 = c.ffn_hidden_size * (2 if c.gated_linear_unit else 1)
    return d * (q + 2 * kv) + q * d + d * fc1 + c.ffn_hidden_size * d


def _norm_params(c) -> int:
    return c.hidden_size * (2 if c.normalization == "LayerNorm" else 1)


def layer_parameters(c) -> int:
    """Parameters of one transformer layer (two norms, attention, MLP, biases)."""
    d, hd = c.hidden_size, c.kv_channels
    q, kv = c.num_attention_heads * hd, (c.num_query_groups or c.num_attention_heads) * hd
    fc1 = c.ffn_hidden_size * (2 if c.gated_linear_unit else 1)
    biases = 0
    if c.add_bias_linear:
        biases += d + fc1 + d  # proj, fc1, fc2
    if c.add_bias_linear or c.add_qkv_bias:
        biases += q + 2 * kv
    qk_norm = 2 * hd * (2 if c.normalization == "LayerNorm" else 1) if c.qk_layernorm else 0
    return _layer_weights(c) + biases + 2 * _norm_params(c) + qk_norm


def resampling_parameters(c) -> int:
    """Scorers, allocators (iterations with g > 1) and MeSH routers (T + 1 pairs, no bias)."""
    d, n = c.hidden_size, 0
    for lv in c.levels:
        if lv.chunk_size > 1:
            n += d if c.downscale == "self-aggregation" else 0
            n += (d + 1) * lv.chunk_size if c.upscale == "allocate" else 0
    if c.topology == "mesh" and c.levels:
        n += 2 * (c.num_loops + 1) * d * c.mesh_slots
    return n


def unique_parameters(c, vocab_size: int, tied_embeddings: bool = False) -> int:
    """Every distinct parameter of SpiralGPTModel (each shared core weight counted once)."""
    embedding = vocab_size * c.hidden_size
    head = 0 if tied_embeddings else vocab_size * c.hidden_size
    return embedding + head + c.num_layers * layer_parameters(c) + resampling_parameters(c) + _norm_params(c)


def layer_flops(c, n: int) -> int:
    """Forward FLOPs of one layer over n positions (per sequence)."""
    return 2 * n * _layer_weights(c) + 4 * n * n * c.num_attention_heads * c.kv_channels


def forward_flops(c, seq_length: int, vocab_size: int) -> int:
    """Forward FLOPs for one sequence of `seq_length` tokens."""
    L, d = seq_length, c.hidden_size
    flops = (c.num_prelude_layers + c.num_coda_layers) * layer_flops(c, L) + 2 * L * d * vocab_size
    for lv in c.levels:
        n = schedule.latent_length(L, lv)
        flops += c.num_core_layers * layer_flops(c, n)
        if lv.chunk_size > 1:
            flops += 2 * L * d * (c.downscale == "self-aggregation")  # scorer
            flops += 2 * L * d * (c.upscale == "allocate")  # allocator: n latents x g slots
    if c.topology == "mesh" and c.levels:
        flops += (c.num_loops + 1) * 2 * 2 * L * d * c.mesh_slots  # T + 1 write and read routers
    return flops


def training_flops(c, seq_length: int, vocab_size: int) -> int:
    """Forward + backward FLOPs for one sequence (3 x forward)."""
    return 3 * forward_flops(c, seq_length, vocab_size)
