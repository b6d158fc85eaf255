"""SpiralForCausalLM: SpiralFormer for Hugging Face `transformers` (docs/MODEL.md, docs/HF.md), plain PyTorch.

    tokens -> embed_tokens -> prelude -> loop (core x T, multi-resolution) -> coda -> norm -> lm_head

Shipped inside converted model folders (`trust_remote_code=True`); imports only torch,
transformers and its sibling files. Matches the Megatron model of `spiral_megatron` (same
math, batch-first [b, s, d] instead of [s, b, d]).

Decoding (docs/MODEL.md section 6): a `SpiralCache` (cache_spiral.py) holds the prelude's and
coda's keys/values of every token and, per loop level, what the level needs; a new token runs
prelude and coda, and the core of level t only when it closes one of level t's chunks.

Positions count from each row's first real token: chunk boundaries are token positions, so
`position_ids`, when given (generate gives them), must be those positions. A left-padded batch
(attention_mask 0...0 1...1 per row) starts as one batch with every row rolled to start at its
first real token (its padding at the end, where causality keeps it out), so every row's chunks
start at its first real token, at every level, exactly as the row alone: training, evaluation
and a prefill run batched. With a cache, the batch then decodes as one batch, each row at its
own positions (cache_spiral.py: every row's entries stay where the rolled prefill put them,
attention masks what lies past a row's tokens). A pad position predicts nothing (zero
logits, no loss). In training mode a forward keeps no cache unless asked (use_cache=True).
"""

import math
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

from .cache_spiral import SpiralCache
from .configuration_spiral import SpiralFormerConfig
from .layers_spiral import Block, Record, make_norm, rotary_angles, token_positions
from .loop_spiral import SpiralLoop
from .padding_spiral import check_positions, right_aligned, row_pads

logger = logging.get_logger(__name__)


class SpiralPreTrainedModel(PreTrainedModel):
    config_class = SpiralFormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["SpiralDecoderLayer"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # the default; "eager" also returns attention weights

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
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Weights from safetensors only: a pickled `.bin` can run code when loaded, so a folder
        holding only pickles is refused here rather than left to torch's defaults."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("SpiralFormer loads weights from safetensors only; use_safetensors=False is refused")
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir() and not any(folder.glob("model*.safetensors")):
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            raise OSError(f"{str(folder)!r} holds no .safetensors weights"
                          + (f" (only the pickle files {', '.join(pickles)})" if pickles else "")
                          + "; SpiralFormer loads safetensors only: convert with tools/convert_to_hf.py")
        kwargs["use_safetensors"] = True
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _returned(self, out, return_dict: Optional[bool]):
        """A forward's output as transformers' models return it: the dataclass, or its tuple."""
        return out if (return_dict if return_dict is not None else self.config.return_dict) else out.to_tuple()


class SpiralModel(SpiralPreTrainedModel):
    """Embedding -> prelude -> loop -> coda -> final norm; hidden states [b, n, d]. AutoModel's
    class: loaded from a folder, it takes the weights under `model.` and leaves the head."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.weight$"]  # the causal LM's head, not the base model's

    def __init__(self, config: SpiralFormerConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.prelude = Block(config, config.num_prelude_layers)
        self.loop = SpiralLoop(config) if config.chunk_sizes else None
        self.coda = Block(config, config.num_coda_layers)
        self.norm = make_norm(config, config.hidden_size)
        self.post_init()

    def scale(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(d) with `scale_embeddings` (MeSH appendix B)."""
        return embeddings * math.sqrt(self.config.hidden_size) if self.config.scale_embeddings else embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[SpiralCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        """input_ids [b, n] (or inputs_embeds [b, n, d], unscaled, as embed_tokens gives them)
        -> last_hidden_state [b, n, d], the final norm's output (zeros at left padding).
        `cache`: a SpiralCache, filled by earlier calls (input_ids are then only the new tokens)
        or empty. `AutoModel`'s forward; SpiralForCausalLM's runs it. hidden_states: docs/HF.md."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{type(self).__name__} takes exactly one of input_ids and inputs_embeds")
        if cache is not None and not isinstance(cache, SpiralCache):
            raise TypeError(f"cache must be a SpiralCache, as model(ids, use_cache=True).cache returns it, "
                            f"got {type(cache).__name__}")
        c = self.config
        if use_cache is None:  # training (model.train()) keeps no cache unless asked: Trainer reads none
            use_cache = c.use_cache and not self.training
        if use_cache and self.training and self.is_activation_checkpointing:
            logger.warning_once(f"{type(self).__name__}: gradient checkpointing recomputes layers; use_cache=False")
            use_cache = False
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        for name, value in (("output_attentions", output_attentions), ("output_hidden_states", output_hidden_states)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} {value!r} must be True or False")
        if use_cache and cache is None:
            cache = SpiralCache(c)

        e = self.scale(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        n = e.shape[1]
        pads = row_pads(attention_mask, n, cache, use_cache)
        if position_ids is not None:
            check_positions(position_ids, cache, pads, n)
        record = Record(output_hidden_states, output_attentions)
        before = list(cache.lengths) if cache is not None and cache.lengths is not None else None
        out = BaseModelOutputWithPast(
            last_hidden_state=self.hidden(e, cache, pads, record), cache=cache if use_cache else None,
            hidden_states=tuple(record.hidden_states) if output_hidden_states else None,
            attentions=self._padded_attentions(record.attentions, pads, before, n, attention_mask)
            if output_attentions else None,
        )
        return self._returned(out, return_dict)

    def hidden(self, e: torch.Tensor, cache: Optional[SpiralCache] = None, pads: Optional[List[int]] = None,
               record: Optional[Record] = None) -> torch.Tensor:
        """e: scaled embeddings [b, n, d] -> final hidden states [b, n, d]. Without a cache, or
        with an empty one: the whole sequence (filling the cache). With a filled one: the n new
        tokens in one pass (`_segment`). `pads`: each row's left padding, when a batch starts
        left-padded."""
        record = record if record is not None else Record()
        if pads is not None:  # a left-padded start: row_pads gives pads only without a cache or with an empty one
            return self._realigned(e, pads, record, cache)
        if cache is None or cache.seen == 0:
            return self._full(e, cache, record)
        return self._segment(e, cache, record)

    def _full(self, e, cache: Optional[SpiralCache], record: Record) -> torch.Tensor:
        L = e.shape[1]
        angles = rotary_angles(self.config, torch.arange(L, device=e.device))
        record.state(e)
        h = self._block(self.prelude, e, angles, cache.prelude if cache is not None else None, record)
        if self.loop is not None:
            h = self.loop(h, e, cache.levels if cache is not None else None, record)
        h = self._block(self.coda, h, angles, cache.coda if cache is not None else None, record)
        if cache is not None:
            cache.seen = L
        return self._final(h, record)

    def _segment(self, e, cache: SpiralCache, record: Record) -> torch.Tensor:
        """n new tokens after the cache's in one pass, as `_full` from each row's position:
        cache.seen, or each row's own (cache.lengths, a batch that started left-padded). The
        loop's levels run the core on the chunks the n tokens close."""
        n = e.shape[1]
        starts = cache.lengths if cache.lengths is not None else [cache.seen] * e.shape[0]
        angles = rotary_angles(self.config, token_positions(starts, n, e.device))  # [n, rot] or [b, 1, n, rot]
        record.state(e)
        h = self._block(self.prelude, e, angles, cache.prelude, record, starts)
        if self.loop is not None:
            h = self.loop.segment(h, e, starts, cache.levels, record)
        h = self._block(self.coda, h, angles, cache.coda, record, starts)
        cache.seen += n
        if cache.lengths is not None:
            cache.lengths = [length + n for length in cache.lengths]
        return self._final(h, record)

    @staticmethod
    def _block(block: Block, x, angles, caches, record: Record, positions: Optional[List[int]] = None) -> torch.Tensor:
        x, weights = block(x, angles, caches, record, positions=positions)
        for w in weights:
            record.attention(w)
        return x

    def _final(self, h, record: Record) -> torch.Tensor:
        """The final norm; as in transformers, the last hidden state recorded is its output."""
        h = self.norm(h)
        if record.hidden_states is not None:
            record.hidden_states[-1] = h
        return h

    def _realigned(self, e, pads: List[int], record: Record, cache: Optional[SpiralCache]) -> torch.Tensor:
        """The start of a left-padded batch as one batch: each row rolled left by its padding
        starts at its first real token, the padding after its last (causality keeps it out of
        the real tokens); the outputs rolled back, padding zeroed. With a cache (a prefill),
        the cache is the rolled batch's, with each row's length: every row's entries are at its
        own positions, and decoding goes on as one batch (`_segment`). Each row as alone
        (tests/hf/test_batching.py)."""
        b, n, d = e.shape
        pad = torch.tensor(pads, device=e.device)[:, None]  # [b, 1]
        cols = torch.arange(n, device=e.device)[None]  # [1, n]
        inner, batch = record.like(), (SpiralCache(self.config) if cache is not None else None)
        h = self.hidden(e.gather(1, ((cols + pad) % n)[..., None].expand(b, n, d)), batch, None, inner)
        lengths = [n - p for p in pads]
        if cache is not None:
            cache.layers, cache.lengths, cache.seen = batch.layers, lengths, n
        if record.hidden_states is not None:  # [b, n, d] rolled back: each row's padding in front, zeros
            record.hidden_states.extend(right_aligned(x, lengths, n, dim=1) for x in inner.hidden_states)
        if record.attentions is not None:  # as the rolled rows have them: forward's _padded_attentions aligns them
            record.attentions.extend(inner.attentions)
        return right_aligned(h, lengths, n, dim=1)

    def _padded_attentions(self, weights: list, pads: Optional[List[int]], before: Optional[List[int]], n: int,
                           attention_mask: Optional[torch.Tensor]) -> tuple:
        """The attention weights of a left-padded batch as its layout has them (other batches'
        as recorded). Its start (`pads`) ran rolled, and a batch that started so decodes each row
        at its own positions (`before`: each row's tokens before these n): a prelude or coda
        entry [b, heads, n, W] gets each row's keys, and at the start its queries, right-aligned
        in the W columns of the padded layout (the attention mask's), zeros at its padding; a
        core entry at level t keeps each row's own latents (counted from its first real token),
        zeros for those of chunks its real tokens have not closed (the row alone reports the
        open last chunk's latent, aggregated over the zeros that pad its end)."""
        if pads is not None:  # the start: each row's last n - pads[r] tokens are real
            before, real, width = [0] * len(pads), [n - p for p in pads], n
        elif before is not None:  # n new tokens per row, all real
            real = [n] * len(before)
            width = attention_mask.shape[1] if attention_mask is not None and attention_mask.shape[1] > n else max(before) + n
        else:
            return tuple(weights)
        levels = [None] * len(self.prelude.layers)
        if self.loop is not None:
            levels += [t for t in range(len(self.config.chunk_sizes)) for _ in self.loop.core.layers]
        levels += [None] * len(self.coda.layers)
        out = []
        for a, t in zip(weights, levels):
            if a is not None and t is None:
                a = right_aligned(a, [i + m for i, m in zip(before, real)], width, dim=3)  # keys
                a = right_aligned(a, real, n, dim=2)  # queries
            elif a is not None:
                a = self.loop.own_latents(t, a, before, real)
            out.append(a)
        return tuple(out)


class SpiralForCausalLM(SpiralPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    accepts_loss_kwargs = True  # forward takes num_items_in_batch: Trainer's accumulation stays exact

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

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[SpiralCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        num_items_in_batch: Optional[torch.Tensor] = None,
    ):
        """input_ids [b, n] (or inputs_embeds [b, n, d], unscaled, as embed_tokens gives them)
        -> logits [b, n, V]. `cache`: a SpiralCache, filled by earlier calls (input_ids are then
        only the new tokens) or empty. Loss: mean over scored tokens, or their sum divided by
        `num_items_in_batch`. hidden_states: docs/HF.md."""
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError(f"labels need logits at every position; logits_to_keep {logits_to_keep} must be 0")
        base = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states, return_dict=True)
        h, n = base.last_hidden_state, base.last_hidden_state.shape[1]
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)  # [b, n', V]
        loss = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [b, n]: what position i predicts
            if attention_mask is not None:  # a pad position predicts nothing
                targets = targets.masked_fill(attention_mask[:, -n:] == 0, -100)
            loss = self.loss_function(logits=logits, labels=None, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch, shift_labels=targets)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=base.cache, hidden_states=base.hidden_states,
                                     attentions=base.attentions)
        return self._returned(out, return_dict)

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, **kwargs):
        """transformers' inputs for the next forward, less the tokenizers `generate` takes for its
        own use (stop_strings, token healing, assisted decoding across vocabularies) and passes on
        with them: forward refuses what it does not take, where transformers' models swallow it.
        `inputs_embeds` is named so that `generate` sees that the prompt may come as embeddings
        (it reads this signature), which forward takes for the first step."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        for key in ("tokenizer", "assistant_tokenizer"):
            inputs.pop(key, None)
        return inputs

    def _validate_generation_mode(self, generation_mode, generation_config, *args, **kwargs):
        """`generate`'s check of its strategy, and one more: assisted decoding (an assistant
        model, prompt lookup) splits every attention entry into one per new token, which the
        core's entries, over latents, are not: output_attentions there is refused, not mangled."""
        super()._validate_generation_mode(generation_mode, generation_config, *args, **kwargs)
        if generation_mode == GenerationMode.ASSISTED_GENERATION and generation_config.output_attentions:
            raise ValueError("output_attentions is not supported with assisted decoding (assistant_model, "
                             "prompt_lookup_num_tokens): transformers splits the weights per new token, and the "
                             "core's are per latent; generate without the assistant, or call the model on the sequences")

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate`'s hook: the model's own Cache (assisted decoding needs one before the first
        call); a cache the caller passes must be a SpiralCache (checked in forward). Another
        `cache_implementation` than "dynamic" (which SpiralCache is) is refused, not ignored."""
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation {implementation!r} is not supported: SpiralForCausalLM decodes "
                             "with its own SpiralCache, which grows as a dynamic cache does (leave it out)")
        generation_config.cache_implementation = None  # "dynamic": transformers would warn that it ignores it
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is not False and model_kwargs.get("cache") is None:
            model_kwargs["cache"] = SpiralCache(self.config)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # SpiralCache is its own kind of cache; `generate` must not make a DynamicCache
