"""SpiralGPTModel: embedding -> prelude -> loop -> coda -> final norm -> output layer (SPEC.md 1).

Built from Megatron's own modules: `LanguageModelEmbedding`, `RotaryEmbedding`,
`TransformerBlock`s of the spec's `TransformerLayer`, and a `ColumnParallelLinear` head.
The forward contract is `GPTModel`'s: logits [b, s, V] without labels, per-token loss [b, s]
with them. Tensors inside are sequence-first, [s, b, h] (s = this rank's slice under SP).
"""

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

from spiral_megatron import schedule
from spiral_megatron.config import SpiralConfig, block_config
from spiral_megatron.layer_specs import SpiralModelSubmodules, get_spiral_model_spec
from spiral_megatron.loop import SpiralLoop

POSITION_EMBEDDINGS = ("rope", "none")


class SpiralGPTModel(LanguageModule):
    """A SpiralFormer language model on Megatron-Core.

    Args mirror GPTModel's: `spec` defaults to the local backend's spec for `config`;
    `pre_process`/`post_process` say whether this pipeline stage owns the embedding and the
    output layer (a stage without `pre_process` takes its input from `set_input_tensor`).
    """

    def __init__(
        self,
        config: SpiralConfig,
        vocab_size: int,
        max_sequence_length: int,
        spec: Optional[SpiralModelSubmodules] = None,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = False,
        position_embedding_type: str = "rope",
        rotary_percent: float = 1.0,
        rotary_base: int = 10000,
        pg_collection=None,
    ):
        super().__init__(config=config, pg_collection=pg_collection)
        if position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding_type {position_embedding_type!r} must be one of {POSITION_EMBEDDINGS}"
            )
        spec = spec or get_spiral_model_spec(config)
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process = pre_process
        self.post_process = post_process
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.position_embedding_type = position_embedding_type
        self.model_type = ModelType.encoder_or_decoder
        self.levels = config.levels
        self.input_tensor = None

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                position_embedding_type=position_embedding_type,
                tp_group=self.pg_collection.tp,
            )
        if position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=rotary_percent,
                rotary_interleaved=config.rotary_interleaved,
                rotary_base=rotary_base,
                use_cpu_initialization=config.use_cpu_initialization,
            )
        self.prelude = self._block(spec.layer, config.num_prelude_layers, final_norm=None)
        self.loop = SpiralLoop(config, spec.loop, self.pg_collection) if self.levels else None
        self.coda = self._block(spec.layer, config.num_coda_layers, final_norm=spec.final_norm)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights,
                tp_group=self.pg_collection.tp,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def _block(self, layer_spec, num_layers: int, final_norm) -> TransformerBlock:
        return TransformerBlock(
            config=block_config(self.config, num_layers),
            spec=TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=final_norm),
            post_layer_norm=final_norm is not None,
            pg_collection=self.pg_collection,
        )

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand a non-first stage its input here."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "SpiralGPTModel takes one input tensor"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        labels: Optional[torch.Tensor] = None,
        decoder_input: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids, position_ids: [b, s]; attention_mask: causal [b|1, 1, s, s] or None.

        Returns logits [b, s, V(/tp)] without labels, else the per-token loss [b, s].
        """
        if decoder_input is not None:
            h = decoder_input
        elif self.pre_process:
            h = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
        else:
            h = self.input_tensor
        sp = self.config.sequence_parallel
        tp = self.pg_collection.tp.size() if sp else 1
        seq = h.shape[0] * tp  # global sequence length
        schedule.check_sequence_layout(seq, self.levels, self.config.tensor_model_parallel_size, sp)
        padded = schedule.padded_length(seq, self.levels)
        rope = self.rotary_pos_emb(padded) if self.position_embedding_type == "rope" else None
        token_rope = rope[:seq] if rope is not None else None  # [s, 1, 1, d]

        h = self.prelude(h, attention_mask, rotary_pos_emb=token_rope)  # [s, b, h]
        if self.loop is not None:
            h = self._run_loop(h, padded - seq, rope, use_mask=attention_mask is not None)
        h = self.coda(h, attention_mask, rotary_pos_emb=token_rope)  # [s, b, h], final norm applied
        if not self.post_process:
            return h

        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(h, weight=weight)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [b, s, V/tp]
        return self.compute_language_model_loss(labels, logits)  # [b, s]

    def _run_loop(self, h: torch.Tensor, pad: int, rope, use_mask: bool) -> torch.Tensor:
        """The loop on h [s, b, h], padded at the end to a multiple of every chunk size.

        End padding sits after every real token, so causality keeps it out of their outputs;
        under sequence parallelism the layout rule guarantees pad == 0.
        """
        if pad:
            h = torch.cat([h, h.new_zeros((pad,) + h.shape[1:])], dim=0)  # [S, b, h]
        h = self.loop(h, rope, use_mask=use_mask)
        return h[: h.shape[0] - pad] if pad else h
