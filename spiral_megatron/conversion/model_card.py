"""README.md of a converted folder: its model card on the Hugging Face Hub (the metadata the Hub
reads, what the model is, where it came from, how to load it), written from the folder's config."""

from typing import Sequence

from spiral_megatron.config import schedule


def _rows(rows: Sequence) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def model_card(name: str, config, parameters: int, source: str, iteration: int, padded: bool) -> str:
    """The card of folder `name`: `config` its SpiralFormerConfig, `parameters` the weights it
    holds, converted from checkpoint `source` at `iteration`; `padded`: it holds
    megatron_vocab_padding.safetensors."""
    loop = (f"topology {config.topology}, down-scale {config.downscale}, up-scale {config.upscale}, "
            f"shift {config.shift}" if config.chunk_sizes else "none")
    rows = [("architecture", schedule.depth_text(config.num_prelude_layers, config.num_core_layers,
                                                 config.chunk_sizes or (), config.num_coda_layers)),
            ("width", f"hidden {config.hidden_size}, {config.num_attention_heads} heads "
                      f"({config.num_key_value_heads} key-value), MLP {config.intermediate_size}"
                      f"{' gated' if config.gated_linear_unit else ''} {config.hidden_act}, {config.normalization}"),
            ("loop", loop),
            ("parameters", f"{parameters:,}"),
            ("vocabulary", f"{config.vocab_size:,} tokens"),
            ("positions", f"{config.position_embedding_type}"
                          + (f", base {config.rope_theta:g}" if config.position_embedding_type == "rope" else "")
                          + f", trained at {config.max_position_embeddings} tokens"),
            ("weights", str(config.dtype).replace("torch.", "")),
            ("converted from", f"`{source}`, iteration {iteration}, by spiral_megatron's tools/convert_to_hf.py")]
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- spiralformer
- looped-transformer
- megatron-core
- custom_code
---

# {name}

A SpiralFormer (arXiv 2602.11698): a looped transformer whose shared core runs coarse to fine over
several sequence resolutions, each iteration over chunks of g tokens pooled into one latent, its
update spread back over the chunk's tokens and shifted so that no token sees a later one. Trained
with Megatron-Core (spiral_megatron).

{_rows(rows)}

## Use

The model's code ships in this folder (`modeling_spiral.py` and its siblings, plain PyTorch; no
Megatron needed), so loading it takes `trust_remote_code=True`:

```python
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

tokenizer = PreTrainedTokenizerFast.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
batch = tokenizer(["The loop"], return_tensors="pt")
print(tokenizer.decode(model.generate(**batch, max_new_tokens=20)[0]))
```

`AutoModel` loads the base model (hidden states, no output layer);
`AutoModelForSequenceClassification` (with `num_labels`) a classifier or reward model that scores
each sequence's last real token, `AutoModelForTokenClassification` a tagger that scores every
token and `AutoModelForQuestionAnswering` an extractive QA model (span start and end logits),
each with its head new.
""" + ("""
`megatron_vocab_padding.safetensors` keeps the embedding rows Megatron padded beyond the
vocabulary, which this model does not use; spiral_megatron's `tools/convert_from_hf.py` puts them
back for training.
""" if padded else "")
