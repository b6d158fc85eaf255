"""The transformer layer of SpiralFormer in plain PyTorch: Megatron's local GPT layer, batch-first.

    x = x + o_proj(attention(input_layernorm(x)))       pre-LN, causal, RoPE (rotate-half)
    x = x + mlp(post_attention_layernorm(x))             fc1 -> act -> fc2 (or gated: act(gate) * up)

Tensors are [b, s, d]. Each attention keeps its cache as a (key, value) pair of [b, kv_heads,
n, head_dim] tensors after RoPE; `Block.forward` takes and returns one pair per layer.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

KV = Tuple[torch.Tensor, torch.Tensor]
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
    """RoPE angles [n, rot_dim] for integer positions [n], as Megatron's RotaryEmbedding:
    inv_freq in float32 over the first int(head_dim * rotary_percent) dims, halves repeated."""
    if config.position_embedding_type != "rope":
        return None
    dim = config.head_dim
    if config.rotary_percent < 1.0:
        dim = int(dim * config.rotary_percent)
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = torch.outer(positions.to(torch.float32), inv_freq)  # [n, dim/2]
    return torch.cat((freqs, freqs), dim=-1)  # [n, dim]


def apply_rotary(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """t: [b, heads, n, hd]; angles: [n, rot]. Non-interleaved (rotate-half), like Megatron."""
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

    def forward(self, x: torch.Tensor, angles: Optional[torch.Tensor], past: Optional[KV]):
        """x: [b, n, d]; angles: [n, rot] for these n positions; past: cached (k, v) or None.
        The n new queries attend causally to past + new keys. Returns (out [b, n, d], (k, v))."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, n, hd]
        if angles is not None:
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [b, kvh, m, hd]
        out = self._attend(q, k, v)  # [b, heads, n, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), (k, v)

    def _attend(self, q, k, v):
        groups = self.num_heads // self.num_kv_heads
        kr = k.repeat_interleave(groups, dim=1) if groups > 1 else k  # query heads of group i use kv head i
        vr = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        n, m = q.shape[2], k.shape[2]
        if n == 1:
            return F.scaled_dot_product_attention(q, kr, vr)
        if n == m:
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)  # query i sees keys <= m-n+i
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)


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


class SpiralDecoderLayer(nn.Module):
    """One pre-LN transformer layer."""

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.self_attn = SpiralAttention(config)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.mlp = SpiralMLP(config)

    def forward(self, x, angles, past: Optional[KV] = None):
        a, kv = self.self_attn(self.input_layernorm(x), angles, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Block(nn.Module):
    """A stack of layers (prelude, core or coda)."""

    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([SpiralDecoderLayer(config) for _ in range(num_layers)])

    def forward(self, x, angles, past: Optional[List[KV]] = None) -> Tuple[torch.Tensor, List[KV]]:
        """x: [b, n, d]. Returns the output and each layer's (k, v) including these n positions."""
        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, angles, past[i] if past is not None else None)
            kvs.append(kv)
        return x, kvs
