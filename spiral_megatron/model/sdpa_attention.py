"""SDPAttention: Megatron's core attention on torch's `scaled_dot_product_attention`.

Without Transformer Engine, Megatron's local spec computes attention with `DotProductAttention`,
which materialises the scores and probabilities [b, np, s, s] and keeps them for backward:
O(s^2) memory and about 5% MFU on an H200 (issue 15). `torch.nn.functional.
scaled_dot_product_attention` runs a fused kernel instead (flash, cuDNN or memory-efficient on
CUDA, chosen by torch; a flash kernel on CPU without dropout), which keeps O(s) for backward.

Same constructor and forward as `DotProductAttention` on megatron-core 0.16 and 0.19 (it is a
subclass: heads per TP partition, dropout module and softmax scale are Megatron's own):
query [sq, b, np, hn], key and value [sk, b, ng, hn] -> context [sq, b, np * hn].
It computes the same function as Megatron's unfused path (tests/unit/test_sdpa_attention.py):
  * softmax scale: Megatron's, i.e. `softmax_scale` or 1/sqrt(hn). With
    `apply_query_key_layer_scaling` Megatron divides the scores by the layer number and the
    softmax multiplies them back; the product is the same scale, which is what SDPA gets (its
    kernels accumulate in fp32, so the fp16 range problem that scaling avoids does not arise);
  * masks: causal (Megatron's default for a causal layer without a mask, or an explicit
    [b|1, 1, s, s] bool mask equal to the causal one), or none for a padding / no-mask layer
    called without a mask. Any other mask is refused (use attention_backend unfused);
  * dropout on the probabilities under Megatron's CUDA RNG tracker, as Megatron forks it;
  * GQA: keys and values repeated to the query heads, as Megatron does [ours: not SDPA's
    `enable_gqa`, which some torch releases only pass to the flash and math kernels].
Softmax off-by-one / learnable offsets, sliding windows, attention bias and packed sequences are
refused (SpiralGPTModel builds none of them).
"""

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

FALLBACK = "use attention_backend 'unfused' for Megatron's DotProductAttention"


def is_causal_mask(mask: torch.Tensor, sq: int, sk: int) -> bool:
    """True when `mask` (Megatron's convention: bool, True = masked out, broadcastable to
    [b, np, sq, sk]) is the causal mask of a square attention."""
    if mask.dtype != torch.bool or mask.dim() != 4 or sq != sk or tuple(mask.shape[-2:]) != (sq, sk):
        return False
    causal = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu(1)  # [sq, sk]
    return torch.equal(mask, causal.expand_as(mask))


class SDPAttention(DotProductAttention):
    """Megatron's core-attention interface on torch's fused scaled_dot_product_attention."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type {config.softmax_type!r} is not supported by SDPAttention; {FALLBACK}")
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError(f"window_size {config.window_size} is not supported by SDPAttention; {FALLBACK}")
        # Megatron's scores scale times the coefficient its softmax multiplies back (see above).
        coeff = self.layer_number if config.apply_query_key_layer_scaling else 1
        self.sdpa_scale = self.softmax_scale * coeff
        self.kv_repeats = self.num_attention_heads_per_partition // self.num_query_groups_per_partition

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask None or bool
        [b|1, 1, sq, sk] (True = masked) -> context [sq, b, np * hn]. `attn_mask_type` is
        ignored, as Megatron's DotProductAttention ignores it (the layer's own type counts)."""
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported by SDPAttention; use Transformer Engine")
        if attention_bias is not None:
            raise ValueError(f"attention_bias is not supported by SDPAttention; {FALLBACK}")
        sq, b = query.shape[:2]
        is_causal = self._is_causal(attention_mask, sq, key.shape[0])
        if self.kv_repeats > 1:
            key = key.repeat_interleave(self.kv_repeats, dim=2)  # [sk, b, np, hn]
            value = value.repeat_interleave(self.kv_repeats, dim=2)  # [sk, b, np, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, np, s, hn]
        dropout = self.attention_dropout.p if self.training else 0.0
        with self._dropout_rng(dropout):
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal,
                                                     scale=self.sdpa_scale)  # [b, np, sq, hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)  # [sq, b, hp]

    def _is_causal(self, attention_mask, sq: int, sk: int) -> bool:
        """Whether the attention is causal (True) or full (False), as Megatron's unfused path
        would mask it; a mask SDPA cannot take as one of the two is refused."""
        if attention_mask is not None:
            if is_causal_mask(attention_mask, sq, sk):
                return True
            raise ValueError(
                f"SDPAttention takes only the causal mask (bool, True above the diagonal); got a "
                f"{attention_mask.dtype} mask of shape {tuple(attention_mask.shape)} for sq {sq}, sk {sk} that "
                f"is not it; {FALLBACK}")
        if self.attn_mask_type in (AttnMaskType.no_mask, AttnMaskType.padding):
            return False  # Megatron applies no mask here either
        if self.attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type {self.attn_mask_type.name} is not supported by SDPAttention; {FALLBACK}")
        if sq == 1:
            return False  # one query (a decode step) sees every key, as in Megatron's softmax
        if sq != sk:
            raise ValueError(f"a causal attention without a mask needs sq == sk, got sq {sq}, sk {sk}")
        return True

    def _dropout_rng(self, dropout: float):
        """Megatron's RNG for attention dropout: the tracker's model-parallel stream (different
        per TP rank, which holds different heads), except under sequence parallelism."""
        if dropout == 0.0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        return tensor_parallel.get_cuda_rng_tracker().fork()
