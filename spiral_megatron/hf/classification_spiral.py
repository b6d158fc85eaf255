"""Task heads on SpiralModel, as transformers' causal LMs have them (Llama's):

    SpiralForSequenceClassification  one score vector per sequence (classifiers, reward models),
        read at each row's last real token: last_hidden_state [b, n, d] -> score -> [b, num_labels]
    SpiralForTokenClassification     one per token (tagging): dropout -> score -> [b, n, num_labels]
    SpiralForQuestionAnswering       a span's start and end logits per token (extractive QA):
        qa_outputs (d -> 2) -> start_logits, end_logits [b, n]

The last real token comes from attention_mask (left or right padding), or is the last position
without one: the tokenizer pads with the end-of-document token, so the pad id cannot tell
padding from a document's end. A left-padded row's hidden states are zeros at its padding
(SpiralModel): label it -100. Losses: transformers' for each head (`loss_function`; the problem
type's for sequences). Loaded from a converted causal-LM folder, the head starts new
(transformers says so), as for any causal LM.
"""

from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import (QuestionAnsweringModelOutput, SequenceClassifierOutputWithPast,
                                           TokenClassifierOutput)

from .cache_spiral import SpiralCache
from .modeling_spiral import SpiralModel, SpiralPreTrainedModel


def last_real(attention_mask: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Each row's last real position among its n new tokens: [b] (or a scalar -1 without a mask)."""
    if attention_mask is None:
        return torch.tensor(-1)
    mask = attention_mask[:, -n:].bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("SpiralFormer: a row of the batch has no real token (attention_mask all 0)")
    return n - 1 - mask.flip(1).int().argmax(dim=1)  # the first 1 from the right


def read_tokens(model: SpiralModel, input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                output_hidden_states):
    """The base model's output for the per-token heads: one read of the tokens, no cache."""
    return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                 use_cache=False, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                 return_dict=True)


class SpiralForSequenceClassification(SpiralPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SpiralModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

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
    ):
        """input_ids [b, n] (or inputs_embeds [b, n, d]) -> logits [b, num_labels], the score at
        each row's last real token. No cache unless use_cache=True (a classifier reads once)."""
        base = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          inputs_embeds=inputs_embeds, use_cache=bool(use_cache), output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states, return_dict=True)
        h = base.last_hidden_state  # [b, n, d]
        last = last_real(attention_mask, h.shape[1]).to(h.device)
        logits = self.score(h[torch.arange(h.shape[0], device=h.device), last])  # [b, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        out = SequenceClassifierOutputWithPast(loss=loss, logits=logits, cache=base.cache,
                                               hidden_states=base.hidden_states, attentions=base.attentions)
        return self._returned(out, return_dict)


class SpiralForTokenClassification(SpiralPreTrainedModel):
    """transformers' GenericForTokenClassification on SpiralModel: dropout (config's
    classifier_dropout, else hidden_dropout, else 0.1), then score (d -> num_labels, with bias
    unless config.token_classification_bias is False)."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SpiralModel(config)
        rate = next((r for r in (getattr(config, "classifier_dropout", None), getattr(config, "hidden_dropout", None))
                     if r is not None), 0.1)
        self.dropout = nn.Dropout(rate)
        self.score = nn.Linear(config.hidden_size, config.num_labels,
                               bias=getattr(config, "token_classification_bias", True))
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        """input_ids [b, n] (or inputs_embeds [b, n, d]) -> logits [b, n, num_labels]; labels
        [b, n] (-100: not scored)."""
        base = read_tokens(self.model, input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                           output_hidden_states)
        logits = self.score(self.dropout(base.last_hidden_state))  # [b, n, num_labels]
        loss = self.loss_function(logits, labels, self.config) if labels is not None else None
        out = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=base.hidden_states,
                                    attentions=base.attentions)
        return self._returned(out, return_dict)


class SpiralForQuestionAnswering(SpiralPreTrainedModel):
    """transformers' GenericForQuestionAnswering on SpiralModel: qa_outputs (d -> 2) gives each
    token a span-start and a span-end logit."""

    def __init__(self, config):
        super().__init__(config)
        self.model = SpiralModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        start_positions: Optional[torch.LongTensor] = None,
        end_positions: Optional[torch.LongTensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        """input_ids [b, n] (or inputs_embeds [b, n, d]) -> start_logits, end_logits [b, n];
        the loss with both start_positions and end_positions [b]."""
        base = read_tokens(self.model, input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                           output_hidden_states)
        start, end = self.qa_outputs(base.last_hidden_state).unbind(-1)  # [b, n] each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start, end, start_positions, end_positions)
        out = QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end,
                                           hidden_states=base.hidden_states, attentions=base.attentions)
        return self._returned(out, return_dict)
