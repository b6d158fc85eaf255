"""SpiralForSequenceClassification: one score vector per sequence (classifiers, reward models),
read at each row's last real token, as transformers' causal LMs do it
(`LlamaForSequenceClassification`):

    tokens -> SpiralModel -> last_hidden_state [b, n, d] -> score (d -> num_labels, no bias) -> [b, num_labels]

The last real token comes from attention_mask (left or right padding), or is the last position
without one: the tokenizer pads with the end-of-document token, so the pad id cannot tell
padding from a document's end. Loss: transformers' for `config.problem_type` (regression,
single- or multi-label). Loaded from a converted causal-LM folder, `score` starts new
(transformers says so), as for any causal LM.
"""

from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

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
