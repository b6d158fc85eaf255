"""SpiralModelProvider: SpiralGPTModel as Megatron-Bridge 0.6.2 builds models.

Bridge 0.6.2 has two ways to describe a model: model providers (a TransformerConfig that
builds its model, as GPTModelProvider builds GPTModel) and the ModelConfig + ModelBuilder pair
its `provide_distributed_model` names as the successor ("ModelProviderMixin-based model
configuration is deprecated. Migrate to ModelConfig + ModelBuilder"). In 0.6.2 only providers
go the whole way, measured on CPU: its conversion API takes nothing else
(`MegatronModelBridge.provider_bridge`, `AutoBridge.to_megatron_provider`, and
`save_megatron_model` / `import_ckpt`, which refuse a model whose config is not a
ModelProviderMixin), and its `pretrain()` cannot train a ModelConfig to the end: the JIT
warm-up reads `seq_length` from the nested TransformerConfig (AttributeError) and resuming
reads the parallel sizes flat from the saved `run_config.yaml["model"]` (KeyError); every 0.6.2
recipe is a provider. So this is a provider, in Bridge's GPTModelProvider family: a
SpiralTransformerConfig (every SpiralConfig field, with Bridge's deferred validation) plus
GPTModel's arguments, whose `provide()` builds one pipeline stage as the project's own job does
(job/build.py): `model_args.make_model` with the backend's spec, then `init.initialize`,
which draws every weight from (seed, its checkpoint key), so the same seed gives the same model
in Bridge, in the job and at every TP/PP layout.
"""

import json
from dataclasses import dataclass, fields
from typing import Optional

from megatron.bridge.models.model_provider import ModelProviderMixin
from megatron.bridge.models.transformer_config import TransformerConfig as BridgeTransformerConfig
from megatron.training.vocab_utils import calculate_padded_vocab_size

from spiral_megatron.job import build
from spiral_megatron.model import init
from spiral_megatron.config.spiral_config import SpiralConfig
from spiral_megatron.model.model_args import ModelArgs, make_model

BACKENDS = ("local", "transformer_engine")  # transformer_impl values; the spec backend of the same name
POSITION_EMBEDDINGS = ("rope", "none")


@dataclass
class SpiralTransformerConfig(BridgeTransformerConfig, SpiralConfig):
    """SpiralConfig with Bridge's deferred post-init: fields may be overridden (recipes, CLI)
    until `finalize()`, which runs SpiralFormer's own checks and derivations around Megatron's
    (SpiralConfig.__post_init__ in its two halves) with Bridge's preparations in between."""

    def finalize(self) -> None:
        self._derive_spiral_fields()
        super().finalize()  # Bridge: string fields, SP off at TP 1, Megatron's __post_init__
        self._check_after_megatron()


@dataclass(kw_only=True)
class SpiralModelProvider(SpiralTransformerConfig, ModelProviderMixin):
    """Every SpiralConfig field plus GPTModel's arguments; `provide()` builds one stage."""

    vocab_size: Optional[int] = None
    """Unpadded vocabulary; None = the tokenizer's (Bridge's setup fills it and pads)."""

    make_vocab_size_divisible_by: int = 128
    """Embedding rows are padded to a multiple of this x TP when `should_pad_vocab`."""

    should_pad_vocab: bool = False
    """Pad `vocab_size` for TP (Bridge's setup sets it when it takes the tokenizer's vocabulary)."""

    seq_length: int = 4096
    """Training sequence length (the rotary table and the pipeline cost model)."""

    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the word embeddings."""

    position_embedding_type: str = "rope"
    """"rope" or "none"."""

    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates."""

    rotary_base: int = 10000
    """RoPE base period."""

    parallel_output: bool = True
    """Keep the logits split over TP (False gathers them, for inference)."""

    init_seed: int = 1234
    """Seed of the layout-independent initialisation (spiral_megatron/model/init.py); the recipes set
    it to `rng.seed`, as the project's job draws its weights from `--seed`."""

    spiral_model_args: Optional[dict] = None
    """The model's record (the job's model_args.json), filled by `provide()`: Bridge writes it
    to every checkpoint's run_config.yaml, where conversion.megatron_io reads it."""

    def finalize(self) -> None:
        """SpiralFormer's validation, then the refusal of what SpiralGPTModel does not build."""
        super().finalize()
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(f"model.position_embedding_type {self.position_embedding_type!r} must be one of "
                             f"{POSITION_EMBEDDINGS}")
        if self.transformer_impl not in BACKENDS:
            raise ValueError(f"model.transformer_impl {self.transformer_impl!r} must be one of {BACKENDS}")
        if self.mtp_num_layers:
            raise ValueError(f"model.mtp_num_layers {self.mtp_num_layers} is not supported by SpiralGPTModel "
                             f"(leave it None)")

    def padded_vocab_size(self) -> int:
        """Embedding rows: `vocab_size` padded as Megatron pads it when `should_pad_vocab`."""
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is None: set it, or let pretrain() take the tokenizer's")
        if not self.should_pad_vocab:
            return self.vocab_size
        return calculate_padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by,
                                           self.tensor_model_parallel_size)

    def model_args(self) -> ModelArgs:
        """The record of the model's function (the project's model_args.json)."""
        return ModelArgs.from_config(
            self, vocab_size=self.padded_vocab_size(), max_sequence_length=self.seq_length,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            position_embedding_type=self.position_embedding_type, rotary_base=self.rotary_base,
            rotary_percent=self.rotary_percent)

    def provide(self, pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                vp_stage: Optional[int] = None):
        """This rank's pipeline stage of SpiralGPTModel, built and initialised as the job does."""
        if vp_stage is not None:
            raise ValueError(f"vp_stage {vp_stage}: SpiralGPTModel has no virtual pipeline stages")
        pp = self._pg_collection.pp
        pre_process = pp.rank() == 0 if pre_process is None else pre_process
        post_process = pp.rank() == pp.size() - 1 if post_process is None else post_process
        args = self.model_args()
        self.spiral_model_args = json.loads(args.to_json())  # the vocabulary is known now
        model = make_model(self, args, self.transformer_impl, pre_process, post_process, self._pg_collection,
                           parallel_output=self.parallel_output)
        if self.perform_initialization:
            init.initialize(model, self.init_seed)
        return model

    def provide_distributed_model(self, ddp_config=None, *args, pre_wrap_hook=None, post_wrap_hook=None, **kwargs):
        """Bridge's, with what the project's job adds around Megatron DDP (job/build.py): before
        it, a replicated core's bucket boundaries shared by its stages (without them, at PP > 1
        with the distributed optimizer and a core longer than a bucket, the stages' sums of the
        core's gradients mismatch: gloo refuses them); after it, the parameter all-gathers
        chained in the forward's order. Hooks given or registered run first, as Bridge runs them."""
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.utils import get_attr_wrapped_model

        def before(chunks):
            for chunk in chunks:
                build.before_ddp(ddp_config, chunk)
            return chunks

        def after(chunks):
            for chunk in chunks:
                if isinstance(chunk, DistributedDataParallel):
                    build.after_ddp(chunk, get_attr_wrapped_model(chunk, "core_replicas", return_model_obj=True))
            return chunks

        pre = pre_wrap_hook if pre_wrap_hook is not None else self.pre_wrap_hook
        post = post_wrap_hook if post_wrap_hook is not None else self.post_wrap_hook
        return super().provide_distributed_model(ddp_config, *args, pre_wrap_hook=[*_hooks(pre), before],
                                                 post_wrap_hook=lambda chunks: after(_run(post, chunks)), **kwargs)

    @classmethod
    def from_model_args(cls, args: ModelArgs, **runtime) -> "SpiralModelProvider":
        """The provider of a recorded model (model_args.json, or an HF config through
        conversion.hf_config.to_model_args); `runtime` sets SpiralConfig runtime fields."""
        spiral = args.spiral_config(**runtime)  # validated here, as the job builds it
        values = {f.name: getattr(spiral, f.name) for f in fields(SpiralConfig) if f.init}
        return cls(**values, vocab_size=args.vocab_size, seq_length=args.max_sequence_length,
                   share_embeddings_and_output_weights=args.share_embeddings_and_output_weights,
                   position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                   rotary_percent=args.rotary_percent)


def _hooks(hook) -> list:
    """Bridge's pre-wrap hook argument (None, a callable or a list of them) as a list."""
    return [] if hook is None else list(hook) if isinstance(hook, list) else [hook]


def _run(hook, chunks):
    """A post-wrap hook on the model chunks (its result, or the chunks where it returns None)."""
    result = hook(chunks) if hook is not None else None
    return chunks if result is None else result
