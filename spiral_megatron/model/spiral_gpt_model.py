"""SpiralGPTModel: embedding -> prelude -> loop -> coda -> final norm -> output layer (docs/MODEL.md 1).

Built from Megatron's own modules: `LanguageModelEmbedding`, `RotaryEmbedding`,
`TransformerBlock`s of the spec's `TransformerLayer`, and a `ColumnParallelLinear` head.
The forward contract is `GPTModel`'s: logits [b, s, V] without labels, per-token loss [b, s]
with them. Tensors inside are sequence-first, [s, b, h] (s = this rank's slice under SP).

Under pipeline parallelism each rank builds only its stage of the plan (pipeline_plan.py).
What crosses a stage boundary is one tensor: the token states h [s, b, h] outside the loop,
or, inside it, the topology's packed state [k * S, b, h] (S = the padded length; residual
k = 1, anchor k = 2, MeSH k = 1 + B). MeSH starts its buffer from the raw token embeddings,
so before the loop a stage sends them along: (h, e) packed as [2 * s, b, h]. Shapes differ,
so SpiralConfig turns on Megatron's `variable_seq_lengths` (shapes are exchanged before each
message).
"""

import math
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from spiral_megatron import functional_spiral as F
from spiral_megatron.parallel import pipeline, pipeline_plan
from spiral_megatron.config import schedule
from spiral_megatron.config.spiral_config import SpiralConfig, block_config
from spiral_megatron.model import forward_order
from spiral_megatron.model.layer_specs import SpiralModelSubmodules, get_spiral_model_spec
from spiral_megatron.model.loop import SpiralLoop
from spiral_megatron.model.stage_block import StageBlock

POSITION_EMBEDDINGS = ("rope", "none")


class SpiralGPTModel(LanguageModule):
    """A SpiralFormer language model on Megatron-Core (one pipeline stage of it).

    Args mirror GPTModel's: `spec` defaults to the local backend's spec for `config`;
    `pre_process`/`post_process` say whether this stage owns the embedding and the output
    layer (a stage without `pre_process` takes its input from `set_input_tensor`).
    `max_sequence_length` and `vocab_size` also feed the pipeline cost model.
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

        pp_group = self.pg_collection.pp
        self.plan = pipeline_plan.plan(config, max_sequence_length, vocab_size, pp_group.size(),
                                       config.loop_placement, config.pipeline_split)
        self.stage = self.plan[pp_group.rank()]
        self.iterations = self.stage.span("loop")
        self.loop_spans_stages = sum(1 for st in self.plan if st.span("loop")) > 1
        # MeSH's slot 0 is the raw embeddings: stages before the loop's first one hand them on.
        loop_stages = [s for s, st in enumerate(self.plan) if st.span("loop")]
        carry = bool(loop_stages) and config.topology == "mesh"
        self.sends_embeddings = carry and pp_group.rank() < loop_stages[0]
        self.receives_embeddings = carry and not pre_process and pp_group.rank() <= loop_stages[0]

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
        self.prelude = self._block(spec.layer, self.stage.span("prelude"), final_norm=None)
        self.loop = SpiralLoop(config, spec.loop, self.iterations, self.pg_collection) if self.iterations else None
        self.coda = self._block(spec.layer, self.stage.span("coda"), spec.final_norm if post_process else None)
        self.core_replicas = pipeline.CoreReplicas(self.plan, pp_group) if self.levels else None
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
        if self.loop is not None:
            self.core_replicas.mark(self.loop.core)
            self.core_replicas.synchronize(self.loop.core)
        if config.compile_layers:
            # Regional compilation (torchtitan): each layer's call is compiled in place
            # (nn.Module.compile); parameters are graph inputs, so all layers share one graph.
            for layer in [*self.prelude.layers, *self.coda.layers]:
                layer.compile()

    def _block(self, layer_spec, layers: range, final_norm) -> StageBlock:
        return StageBlock(
            config=block_config(self.config, len(layers)),
            spec=TransformerBlockSubmodules(layer_specs=[layer_spec] * len(layers), layer_norm=final_norm),
            post_layer_norm=final_norm is not None,
            pg_collection=self.pg_collection,
            first_layer=layers.start,
        )

    def parameters_in_forward_order(self) -> list:
        """This stage's parameters in the order its forward first uses them: embedding, prelude,
        the loop's iterations (SpiralLoop.modules_in_forward_order), coda, output layer. DDP
        chains its parameter all-gathers in this order (parallel/param_gather.py)."""
        modules = [self.embedding] if self.pre_process else []
        modules.append(self.prelude)
        if self.loop is not None:
            modules += self.loop.modules_in_forward_order()
        modules.append(self.coda)
        if self.post_process:
            modules.append(self.output_layer)
        order = {}  # insertion-ordered, each parameter once (the core's, tied weights)
        for module in modules:
            order.update((param, None) for param in forward_order.parameters_in_forward_order(module)
                         if param not in order)
        return list(order)

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

        Returns logits [b, s, V(/tp)] without labels, else the per-token loss [b, s]; a stage
        without `post_process` returns what it sends on (h, or the packed loop state).
        """
        if decoder_input is not None:
            x = decoder_input
        elif self.pre_process:
            x = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
            if self.config.scale_embeddings:
                x = x * math.sqrt(self.config.hidden_size)  # MeSH appendix B (Pythia)
        else:
            x = self.input_tensor
        if self.receives_embeddings:
            x, embeddings = x.chunk(2, dim=0)  # (h, e) from the previous stage
        else:
            embeddings = x  # the raw embeddings, where this stage starts the model or the loop
        seq, padded = self._lengths(x)
        rope = self.rotary_pos_emb(padded) if self.position_embedding_type == "rope" else None
        token_rope = rope[:seq] if rope is not None else None  # [s, 1, 1, d]

        h = self.prelude(x, attention_mask, rotary_pos_emb=token_rope)  # [s, b, h]
        if self.sends_embeddings:
            return torch.cat([h, embeddings], dim=0)  # [2 * s, b, h]
        if self.loop is not None:
            h = self._run_loop(h, embeddings, padded - seq, rope, use_mask=attention_mask is not None)
            if self.iterations.stop < len(self.levels):
                return h  # the packed loop state, for the next stage
        h = self.coda(h, attention_mask, rotary_pos_emb=token_rope)  # [s, b, h], final norm if last
        if not self.post_process:
            return h

        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(h, weight=weight)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [b, s, V/tp]
        return self.compute_language_model_loss(labels, logits)  # [b, s]

    def _lengths(self, x: torch.Tensor):
        """(global sequence length L, padded length S) from this stage's input, checked."""
        sp = self.config.sequence_parallel
        local = x.shape[0]
        if self.iterations and self.iterations.start > 0:  # a packed loop state [k * S, b, h]
            local //= self.loop.topology.state_size
        seq = local * (self.pg_collection.tp.size() if sp else 1)
        schedule.check_sequence_layout(seq, self.levels, self.config.tensor_model_parallel_size, sp)
        padded = schedule.padded_length(seq, self.levels)
        if padded != seq and self.loop_spans_stages:
            raise ValueError(
                f"seq_length {seq} must be a multiple of {schedule.padding_multiple(self.levels)} (every "
                f"chunk size) when the loop spans pipeline stages: a stage inside the loop only sees "
                f"the padded length"
            )
        return seq, padded

    def _run_loop(self, h: torch.Tensor, embeddings: torch.Tensor, pad: int, rope, use_mask: bool) -> torch.Tensor:
        """This stage's iterations. The first stage of the loop pads h (and the embeddings) at
        the end to a multiple of every chunk size (padding after every real token cannot reach
        them, by causality; under SP the layout rule makes pad 0) and starts the state; the
        last reads it out."""
        topology = self.loop.topology
        if self.iterations.start == 0:
            h = F.pad_to(h, h.shape[0] + pad, dim=0)  # [S, b, h]
            embeddings = F.pad_to(embeddings, embeddings.shape[0] + pad, dim=0)
            state = topology.init(h, embeddings)
        else:
            state = topology.unpack(h)
        state = self.loop(state, rope, use_mask=use_mask)
        if self.iterations.stop < len(self.levels):
            return topology.pack(state)  # [k * S, b, h]
        h = topology.read(state)  # [S, b, h]
        return F.crop_to(h, h.shape[0] - pad, dim=0)  # [s, b, h]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Megatron's, with the core's replicas on later stages marked as copies (one is saved)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.loop is not None:
            self.core_replicas.mark_copies(state, f"{prefix}loop.core.")
        return state
