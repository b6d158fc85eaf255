"""SpiralBridge: AutoBridge's conversion of a SpiralForCausalLM folder (tools/convert_to_hf.py).

Registered for the architecture name `SpiralForCausalLM` (the folder's `auto_map`, loaded with
`trust_remote_code=True`) and the Megatron class SpiralGPTModel. Nothing is written twice:

* the model config comes from the project's own HF config mapping
  (conversion.hf_config.to_model_args), so every field the converter carries is carried;
* the parameter mappings are generated from the project's name table (conversion.mapping:
  `rules()` plus the Transformer Engine names), each row's transform as Bridge's mapping class:
  `qkv` -> QKVMapping (Megatron's grouped [q_1..q_n, k, v] layout, split over TP by Bridge),
  `glu` -> GatedMLPMapping, `copy` and `vocab` -> AutoMapping (column-, row-parallel or
  replicated from the module: the replicated core, the loop's scorers and allocators and the
  MeSH routers are `ReplicatedLinear`, registered as replicated);
* the vocabulary: the Megatron embedding and output layer keep the job's padded rows
  (`megatron_vocab_size`); import appends the padding rows the converter kept
  (megatron_vocab_padding.safetensors, zeros without it), export trims them and writes them
  back to that file (conversion.mapping.pad_vocab and vocab_padding).
"""

from pathlib import Path

import torch
from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
from megatron.bridge.models.conversion.param_mapping import AutoMapping, GatedMLPMapping, QKVMapping

from spiral_megatron.model.spiral_gpt_model import SpiralGPTModel
from spiral_megatron.bridge.provider import SpiralModelProvider
from spiral_megatron.conversion import hf_config, hf_io, mapping

AutoMapping.register_module_type("ReplicatedLinear", "replicated")  # spiral_megatron/model/replicated_linear.py
VOCAB_ROWS = {"model.embed_tokens.weight": "embedding.word_embeddings.weight", "lm_head.weight": "output_layer.weight"}


def bridge_mappings(gated: bool) -> list:
    """Bridge's mappings of the project's name table: `{i}`/`{t}` become Bridge's `*`
    (digits), `{p}` is written out as weight and bias (a row the model lacks goes unused)."""
    out = []
    for mcore, hf, fn in mapping.rules(gated):
        for p in ("weight", "bias") if "{p}" in mcore else (None,):
            name = _pattern(mcore, p)
            hf_names = [_pattern(h, p) for h in hf]
            if fn == "qkv":
                out.append(QKVMapping(name, q=hf_names[0], k=hf_names[1], v=hf_names[2]))
            elif fn == "glu":
                out.append(GatedMLPMapping(name, gate=hf_names[0], up=hf_names[1]))
            else:  # copy, vocab
                out.append(AutoMapping(name, hf_names[0]))
            for te, local in mapping.TE_NAMES.items():  # TE fuses the pre-norms into the next linear
                if name.endswith("." + local):
                    out.append(AutoMapping(name[: -len(local)] + te, hf_names[0]))
    return out


def _pattern(pattern: str, p) -> str:
    out = pattern.replace("{i}", "*").replace("{t}", "*")
    return out.replace("{p}", p) if p else out


@MegatronModelBridge.register_bridge(source="SpiralForCausalLM", target=SpiralGPTModel, model_type="spiralformer")
class SpiralBridge(MegatronModelBridge):
    """HF SpiralForCausalLM <-> Megatron SpiralGPTModel."""

    def provider_bridge(self, hf_pretrained) -> SpiralModelProvider:
        """The Megatron model of the folder's config, as the project's converter builds it
        (hf_config.to_model_args), with the folder's dtype as the parameter dtype."""
        config = hf_pretrained.config
        args = hf_config.to_model_args(config)
        dtype = self.dtype_from_hf(config, default=torch.float32)
        return SpiralModelProvider.from_model_args(args, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                                   fp16=dtype == torch.float16, transformer_impl="local")

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*bridge_mappings(bool(self.hf_config.gated_linear_unit)))

    def maybe_modify_loaded_hf_weight(self, hf_param, hf_state_dict):
        """HF -> Megatron: the embedding and output rows with the Megatron padding rows the
        converter kept appended (Bridge pads with zeros what is still missing)."""
        weights = super().maybe_modify_loaded_hf_weight(hf_param, hf_state_dict)
        if isinstance(hf_param, str) and hf_param in VOCAB_ROWS:
            name = VOCAB_ROWS[hf_param]
            padding = {name: hf_state_dict[name]} if name in hf_state_dict else self._padding_file()
            weights = mapping.pad_vocab({name: weights}, padding, hf_config.shapes_of(self.hf_config))[name]
        return weights

    def maybe_modify_converted_hf_weight(self, task, converted_weights_dict, hf_state_dict):
        """Megatron -> HF: the embedding and output rows trimmed to the tokenizer's vocabulary;
        the rows beyond it go under their Megatron name (megatron_vocab_padding.safetensors's
        tensors) when the source folder keeps them."""
        out = {}
        for name, weights in converted_weights_dict.items():
            if name in VOCAB_ROWS:
                rows = self.hf_config.vocab_size
                padding = mapping.vocab_padding({VOCAB_ROWS[name]: weights}, hf_config.shapes_of(self.hf_config))
                out.update({k: v for k, v in padding.items() if k in hf_state_dict})
                weights = weights[:rows]
            out[name] = weights
        return out

    def _padding_file(self) -> dict:
        """The padding rows in the folder's megatron_vocab_padding.safetensors, read directly
        when the folder's index (sharded weights) does not list them."""
        folder = getattr(self.hf_pretrained, "model_name_or_path", None)
        return hf_io.read_padding(Path(folder)) if folder else {}
