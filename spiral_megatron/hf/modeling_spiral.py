"""SpiralForCausalLM: SpiralFormer for Hugging Face `transformers` (docs/MODEL.md), plain PyTorch.

    tokens -> embed_tokens -> prelude -> loop (core x T, multi-resolution) -> coda -> norm -> lm_head

Shipped inside converted model folders (`trust_remote_code=True`); imports only torch,
transformers and its sibling files. Matches the Megatron model of `spiral_megatron` (same
math, batch-first [b, s, d] instead of [s, b, d]).

Decoding (docs/MODEL.md section 6): `SpiralCache` holds the prelude's and coda's keys/values for
every token and, per loop level, a latent key/value cache; a new token runs prelude and coda,
and the core of level t only when it closes one of level t's chunks.

Positions count from each row's first real token: chunk boundaries are token positions, so
`position_ids` are ignored. A left-padded batch (attention_mask 0...0 1...1 per row) runs row
by row, each row without its padding and with its own cache (`SpiralRowsCache`): every row's
chunks then start at its first real token, at every level, exactly as the row alone; the batch
gives batch size 1's tokens, at batch size 1's speed (see `_row_pads`).
"""

import copy
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_spiral import SpiralFormerConfig
from .layers_spiral import KV, Block, make_norm, rotary_angles
from .loop_spiral import LevelCache, SpiralLoop

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


class SpiralCache:
    """Everything decoding keeps after `seen_tokens` tokens (all rows the same length)."""

    def __init__(self, prelude: List[KV], coda: List[KV], levels: List[LevelCache], seen_tokens: int):
        self.prelude, self.coda, self.levels, self.seen_tokens = prelude, coda, levels, seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        fn = lambda x: x.index_select(0, beam_idx.to(x.device))  # noqa: E731
        self.prelude = [(fn(k), fn(v)) for k, v in self.prelude]
        self.coda = [(fn(k), fn(v)) for k, v in self.coda]
        for level in self.levels:
            level.map(fn)


class SpiralRowsCache:
    """The cache of a left-padded batch: one SpiralCache per row (each row runs alone, without
    its padding) and the number of columns of the batch seen so far."""

    def __init__(self, rows: List[SpiralCache], seen_tokens: int):
        self.rows, self.seen_tokens = rows, seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select rows (beam search); a row picked twice gets its own copy (caches grow in place)."""
        picked, rows = set(), []
        for i in beam_idx.tolist():
            rows.append(copy.deepcopy(self.rows[i]) if i in picked else self.rows[i])
            picked.add(i)
        self.rows = rows


# transformers 5 renamed the output's `past_key_values` to `cache` (and renames it on init).
CACHE_FIELD = "cache" if _TRANSFORMERS_5 else "past_key_values"


if _TRANSFORMERS_5:

    @dataclass
    class SpiralCausalLMOutput(ModelOutput):
        """Logits [b, s, V], the loss when labels are given, the cache when `use_cache`."""

        loss: Optional[torch.FloatTensor] = None
        logits: Optional[torch.FloatTensor] = None
        cache: Optional[SpiralCache] = None

else:

    @dataclass
    class SpiralCausalLMOutput(ModelOutput):
        """Logits [b, s, V], the loss when labels are given, the cache when `use_cache`."""

        loss: Optional[torch.FloatTensor] = None
        logits: Optional[torch.FloatTensor] = None
        past_key_values: Optional[SpiralCache] = None


class SpiralPreTrainedModel(PreTrainedModel):
    config_class = SpiralFormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["SpiralDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # SpiralCache is its own kind of cache; `generate` must not make a DynamicCache


class SpiralModel(SpiralPreTrainedModel):
    """Embedding -> prelude -> loop -> coda -> final norm; returns hidden states [b, s, d]."""

    def __init__(self, config: SpiralFormerConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.prelude = Block(config, config.num_prelude_layers)
        self.loop = SpiralLoop(config) if config.chunk_sizes else None
        self.coda = Block(config, config.num_coda_layers)
        self.norm = make_norm(config, config.hidden_size)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor, cache: Optional[SpiralCache] = None, use_cache: bool = False):
        """input_ids [b, n]. Without a cache: the whole sequence (and, with `use_cache`, a new
        SpiralCache). With one: the n new tokens, one at a time (docs/MODEL.md 6)."""
        if cache is None:
            return self._full(input_ids, use_cache)
        outs = [self._step(input_ids[:, k : k + 1], cache) for k in range(input_ids.shape[1])]
        return torch.cat(outs, dim=1), cache

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token embeddings [b, n, d], times sqrt(d) with `scale_embeddings` (MeSH appendix B)."""
        e = self.embed_tokens(input_ids)
        return e * math.sqrt(self.config.hidden_size) if self.config.scale_embeddings else e

    def _full(self, input_ids, use_cache: bool):
        L = input_ids.shape[1]
        angles = rotary_angles(self.config, torch.arange(L, device=input_ids.device))
        e = self.embed(input_ids)  # [b, L, d]
        h, pre_kv = self.prelude(e, angles)
        levels = [] if use_cache else None
        if self.loop is not None:
            h = self.loop(h, e, levels)
        h, coda_kv = self.coda(h, angles)
        cache = SpiralCache(pre_kv, coda_kv, levels, L) if use_cache else None
        return self.norm(h), cache

    def _step(self, input_ids, cache: SpiralCache) -> torch.Tensor:
        i = cache.seen_tokens
        angles = rotary_angles(self.config, torch.tensor([i], device=input_ids.device))
        e = self.embed(input_ids)  # [b, 1, d]
        h, cache.prelude = self.prelude(e, angles, cache.prelude)
        if self.loop is not None:
            h = self.loop.step(h, e, i, cache.levels)
        h, cache.coda = self.coda(h, angles, cache.coda)
        cache.seen_tokens = i + 1
        return self.norm(h)


class SpiralForCausalLM(SpiralPreTrainedModel, GenerationMixin):
    if _TRANSFORMERS_5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: SpiralFormerConfig):
        super().__init__(config)
        self.model = SpiralModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[SpiralCache] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        return_dict: Optional[bool] = None,
        cache: Optional[SpiralCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        **unused,
    ):
        """input_ids [b, n] -> logits [b, n, V]. `past_key_values` (or `cache`): a SpiralCache
        from an earlier call; `input_ids` are then only the new tokens. `position_ids` are
        ignored (positions are absolute, see the module docstring)."""
        if inputs_embeds is not None:
            raise ValueError("SpiralForCausalLM takes input_ids, not inputs_embeds")
        past = past_key_values if past_key_values is not None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        pads = _row_pads(attention_mask, input_ids.shape[1], past, use_cache)
        if pads is not None or isinstance(past, SpiralRowsCache):
            logits, new_cache = self._forward_rows(input_ids, pads, past, use_cache or past is not None)
        else:
            h, new_cache = self.model(input_ids, past, use_cache or past is not None)
            logits = self.lm_head(h)  # [b, n, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        out = SpiralCausalLMOutput(loss=loss, logits=logits, **{CACHE_FIELD: new_cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()

    def _forward_rows(self, input_ids, pads: Optional[List[int]], past: Optional[SpiralRowsCache], use_cache: bool):
        """A left-padded batch, row by row: logits [b, n, V] (zeros at padding) and a
        SpiralRowsCache. Without `past`, row r's first pads[r] tokens are padding."""
        b, n = input_ids.shape
        logits = torch.zeros(b, n, self.config.vocab_size, dtype=self.lm_head.weight.dtype, device=input_ids.device)
        rows = []
        for r in range(b):
            start = pads[r] if past is None else 0
            h, cache = self.model(input_ids[r : r + 1, start:], past.rows[r] if past is not None else None, use_cache)
            logits[r : r + 1, start:] = self.lm_head(h)  # [1, n - start, V]
            rows.append(cache)
        seen = n if past is None else past.seen_tokens + n
        return logits, (SpiralRowsCache(rows, seen) if use_cache else None)

    # ---- generate() glue, independent of the transformers version's own cache plumbing ----
    def prepare_inputs_for_generation(self, input_ids, spiral_cache=None, attention_mask=None, use_cache=None, **kw):
        if spiral_cache is not None:
            input_ids = input_ids[:, spiral_cache.seen_tokens :]  # only tokens the cache has not seen
        return dict(input_ids=input_ids, past_key_values=spiral_cache, attention_mask=attention_mask,
                    use_cache=use_cache)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens: int = 1, **unused):
        model_kwargs["spiral_cache"] = outputs.get(CACHE_FIELD)
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], num_new_tokens)], dim=-1)
        return model_kwargs

    def _reorder_cache(self, past, beam_idx):
        past.reorder_cache(beam_idx)
        return past


def _row_pads(attention_mask, num_new: int, past, use_cache: bool) -> Optional[List[int]]:
    """The padding of each row when the batch is left-padded (run row by row), else None.

    Accepted: no mask or an all-ones mask; left padding (0...0 1...1 per row) when the batch
    starts (no cache yet); right padding (1...1 0...0) in a plain forward without a cache. After a
    left-padded start (a SpiralRowsCache), the new tokens must all be real.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    if isinstance(past, SpiralRowsCache):
        if bool(attention_mask[:, -num_new:].all()):
            return None
        raise ValueError("SpiralForCausalLM: tokens after a left-padded start must all be real (attention_mask 1)")
    mask = attention_mask.long()
    steps = mask.diff(dim=-1)
    if past is None and bool((steps >= 0).all()):  # 0...0 1...1 per row
        if not bool(mask[:, -1].all()):
            raise ValueError("SpiralForCausalLM: a row of the batch has no real token (attention_mask all 0)")
        return (mask.shape[1] - mask.sum(dim=1)).tolist()
    if past is None and not use_cache and bool((steps <= 0).all()):  # 1...1 0...0: right padding
        return None
    raise ValueError(
        "SpiralForCausalLM: attention_mask must be left padding (0...0 1...1 per row) at the start of a "
        "batch, or right padding in a plain forward with use_cache=False; padding in the middle of a row or "
        "added to a running cache is not supported (chunk boundaries count from a row's first real token)."
    )
