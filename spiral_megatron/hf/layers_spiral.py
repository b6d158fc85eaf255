"""The transformer layer of SpiralFormer in plain PyTorch: Megatron's local GPT layer, batch-first.

    x = x + o_proj(attention(input_layernorm(x)))       pre-LN, causal, RoPE (rotate-half)
    x = x + mlp(post_attention_layernorm(x))             fc1 -> act -> fc2 (or gated: act(gate) * up)

Tensors are [b, s, d]. An attention's cache is a transformers `DynamicLayer` holding keys and
values [b, kv_heads, n, head_dim] after RoPE. Attention runs as `config._attn_implementation`
says: "sdpa" (the default) or "eager", which alone can return the attention weights. Each layer
is a `GradientCheckpointingLayer`, so `gradient_checkpointing_enable()` recomputes it in backward.
`Record` keeps what `output_hidden_states` / `output_attentions` ask for (docs/HF.md).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .cache_spiral import row_columns, write_at


class Record:
    """The hidden states and attention weights one forward was asked to return (None: not asked)."""

    def __init__(self, hidden_states: bool = False, attentions: bool = False):
        self.hidden_states: Optional[list] = [] if hidden_states else None
        self.attentions: Optional[list] = [] if attentions else None

    def like(self) -> "Record":
        return Record(self.hidden_states is not None, self.attentions is not None)

    def state(self, h: torch.Tensor) -> None:
        if self.hidden_states is not None:
            self.hidden_states.append(h)

    def attention(self, weights: Optional[torch.Tensor]) -> None:
        if self.attentions is not None:
            self.attentions.append(weights)

    def join(self, parts: List["Record"], dim: int) -> None:
        """Append the hidden states of `parts` (calls over consecutive tokens, dim=1, or over the
        rows of a batch, dim=0)."""
        if self.hidden_states is None:
            return
        for entries in zip(*(part.hidden_states for part in parts)):
            self.hidden_states.append(torch.cat(entries, dim=dim))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GeLU: transformers' "gelu_pytorch_tanh", and what Megatron's
    fused bias-GeLU computes (megatron/core/fusions/fused_bias_gelu.py)."""
    return F.gelu(x, approximate="tanh")


ACT = {"gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh, "silu": F.silu, "relu": F.relu}


def make_norm(config, size: int) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(size, eps=config.layer_norm_eps)
    return nn.LayerNorm(size, eps=config.layer_norm_eps)


def rotary_angles(config, positions: torch.Tensor) -> Optional[torch.Tensor]:
    """RoPE angles [.., rot_dim] for integer positions [..] (`token_positions`), as Megatron's
    RotaryEmbedding: inv_freq in float32 over the first int(head_dim * rotary_percent) dims,
    halves repeated."""
    if config.position_embedding_type != "rope":
        return None
    dim = config.head_dim
    if config.rotary_percent < 1.0:
        dim = int(dim * config.rotary_percent)
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [.., dim/2]
    return torch.cat((freqs, freqs), dim=-1)  # [.., dim]


def token_positions(starts: List[int], n: int, device) -> torch.Tensor:
    """The positions of each row's n tokens from starts[r]: [n] when the rows start alike, else
    [b, 1, n] (their angles [b, 1, n, rot] broadcast over the heads)."""
    if all(s == starts[0] for s in starts):
        return starts[0] + torch.arange(n, device=device)
    return row_columns(starts, n, 3, 2, device)


def apply_rotary(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """t: [b, heads, n, hd]; angles: [n, rot], or [b, 1, n, rot] per row (`token_positions`).
    Non-interleaved (rotate-half), like Megatron."""
    rot = angles.shape[-1]
    t, t_pass = t[..., :rot], t[..., rot:]
    cos, sin = torch.cos(angles).to(t.dtype), torch.sin(angles).to(t.dtype)
    x1, x2 = torch.chunk(t, 2, dim=-1)
    t = t * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((t, t_pass), dim=-1)


class SpiralAttention(nn.Module):
    """Causal self-attention with grouped queries; Megatron's fused QKV split into q/k/v_proj."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # read at call time: set_attn_implementation may change it
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        qkv_bias = config.add_bias_linear or config.add_qkv_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=config.add_bias_linear)
        if config.qk_layernorm:  # per head, before RoPE (Megatron's q_layernorm / k_layernorm)
            self.q_norm, self.k_norm = make_norm(config, hd), make_norm(config, hd)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, angles: Optional[torch.Tensor], cache=None, output_attentions: bool = False,
                positions: Optional[List[int]] = None):
        """x: [b, n, d]; angles: [n, rot] for these n positions; cache: a DynamicLayer or None.
        The n new queries attend causally to cached + new keys. `positions`: where each row's n
        new tokens start in the cache; rows whose cache ends there append, and other rows (a
        batch that started left-padded, SpiralCache.lengths; angles [b, 1, n, rot]) write their
        keys there and attend to their keys up to each query. Returns (out [b, n, d], weights
        [b, heads, n, m] with `output_attentions`, else None)."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, n, hd]
        if angles is not None:
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        mask = None
        if positions is not None and any(p != cache.get_seq_length() for p in positions):
            # [b, kvh, m, hd]: each row's keys at its own positions, then ones no row reads
            k = cache.keys = write_at(cache.keys, k, positions, dim=2)
            v = cache.values = write_at(cache.values, v, positions, dim=2)
            queries = row_columns(positions, n, 4, 2, k.device)  # [b, 1, n, 1]: each query's position
            mask = torch.arange(k.shape[2], device=k.device) <= queries  # [b, 1, n, m]
        elif cache is not None:
            k, v = cache.update(k, v)  # [b, kvh, m, hd]: cached keys, then these n
        if self.config._attn_implementation == "eager":
            out, weights = self._attend_eager(q, k, v, mask)
        elif output_attentions:
            raise ValueError(f"output_attentions=True needs attn_implementation='eager', the model runs "
                             f"{self.config._attn_implementation!r}: load it with attn_implementation='eager'")
        else:
            out, weights = self._attend(q, k, v, mask), None  # [b, heads, n, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), (weights if output_attentions else None)

    def _kv_heads(self, k, v):
        groups = self.num_heads // self.num_kv_heads  # query heads of group i use kv head i
        return (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)) if groups > 1 else (k, v)

    def _attend(self, q, k, v, mask=None):
        """scaled_dot_product_attention, causal over the last n of m keys, or over the keys
        `mask` [b, 1, n, m] allows."""
        kr, vr = self._kv_heads(k, v)
        n, m = q.shape[2], k.shape[2]
        if mask is not None:
            return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
        if n == 1:
            return F.scaled_dot_product_attention(q, kr, vr)
        if n == m:
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=causal_mask(n, m, q.device))

    def _attend_eager(self, q, k, v, mask=None):
        """The same attention written out, softmax in float32: (out, weights [b, heads, n, m])."""
        kr, vr = self._kv_heads(k, v)
        scores = torch.matmul(q, kr.transpose(2, 3)) / self.head_dim**0.5  # [b, heads, n, m]
        allowed = causal_mask(q.shape[2], k.shape[2], q.device) if mask is None else mask
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, vr), weights


def causal_mask(n: int, m: int, device) -> torch.Tensor:
    """[n, m] bool, True where query i (the last n of m positions) may see key j: j <= m - n + i."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(m - n)


class SpiralMLP(nn.Module):
    """fc1 -> act -> fc2, or with a gated linear unit act(gate_proj x) * up_proj x (Megatron's
    `linear_fc1` holds [gate; up])."""

    def __init__(self, config):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.add_bias_linear
        self.act = ACT[config.hidden_act]
        self.gate_proj = nn.Linear(d, f, bias=bias) if config.gated_linear_unit else None
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class SpiralDecoderLayer(GradientCheckpointingLayer):
    """One pre-LN transformer layer. Under gradient checkpointing (training) transformers' wrapper
    recomputes it in backward and drops a `cache` given by keyword."""

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.self_attn = SpiralAttention(config)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.mlp = SpiralMLP(config)

    def forward(self, x, angles, cache=None, output_attentions: bool = False, positions: Optional[List[int]] = None):
        a, weights = self.self_attn(self.input_layernorm(x), angles, cache=cache, output_attentions=output_attentions,
                                    positions=positions)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), weights


class Block(nn.Module):
    """A stack of layers (prelude, core or coda)."""

    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([SpiralDecoderLayer(config) for _ in range(num_layers)])

    def forward(self, x, angles, caches: Optional[list] = None, record: Optional[Record] = None,
                states: bool = True, positions: Optional[List[int]] = None
                ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
        """x: [b, n, d]; caches: one DynamicLayer per layer, or None; positions: each row's own
        (SpiralAttention). Records each layer's output (with `states`) into `record`; returns
        the output and each layer's attention weights (None unless `record` asks for them)."""
        weights = []
        want = record is not None and record.attentions is not None
        for i, layer in enumerate(self.layers):
            x, w = layer(x, angles, cache=caches[i] if caches is not None else None, output_attentions=want,
                         positions=positions)
            weights.append(w)
            if states and record is not None:
                record.state(x)
        return x, weights
