"""Model, Megatron DDP, optimizer and LR scheduler for a TrainingConfig, all from megatron.core."""

from dataclasses import dataclass

import torch

from spiral_megatron.config import flavors
from spiral_megatron.model import fusions, init
from spiral_megatron.model.layer_specs import have_transformer_engine
from spiral_megatron.config.spiral_config import SpiralConfig
from spiral_megatron.model.model_args import ModelArgs, make_model
from spiral_megatron.parallel.pipeline import finalize_model_grads
from spiral_megatron.job.checkpoint import extra_state
from spiral_megatron.job.settings import model_fields
from spiral_megatron.job.settings.keys import TrainingConfig, model_overrides, seq_length, warmup_iters

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

@dataclass
class Components:
    """What the loop trains: `model` is the DDP wrapper of `module` (the SpiralGPTModel)."""

    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: object
    scheduler: object
    model_args: ModelArgs


def padded_vocab_size(vocab_size: int, cfg: TrainingConfig) -> int:
    """Embedding rows: the tokenizer's vocabulary padded as Megatron pads it (divisible x TP)."""
    multiple = cfg.make_vocab_size_divisible_by * cfg.tensor_parallel
    return -(-vocab_size // multiple) * multiple


def make_model_args(config, cfg: TrainingConfig, vocab_size: int) -> ModelArgs:
    """The record of `config`'s function, as saved in model_args.json."""
    return ModelArgs.from_config(config, vocab_size=padded_vocab_size(vocab_size, cfg),
                                 max_sequence_length=seq_length(cfg))


def backend(cfg: TrainingConfig, on_cpu: bool) -> str:
    """The layer-spec backend: `model.transformer_impl` when set (Megatron-LM's
    --transformer-impl), else Transformer Engine on GPUs where importable, else local."""
    chosen = cfg.model.get("transformer_impl")
    if chosen is not None:
        return chosen
    return "transformer_engine" if not on_cpu and have_transformer_engine() else "local"


def fusion_defaults(cfg: TrainingConfig, on_cpu: bool):
    """(Megatron-LM's default fusions for this run, one line per fusion left off), see fusions.py."""
    flavor = flavors.get(cfg.model["flavor"]).model
    arch = {**flavor, **model_fields.as_config_kwargs(model_overrides(cfg))}
    return fusions.defaults(not on_cpu, backend(cfg, on_cpu), arch)


def model_settings(cfg: TrainingConfig, on_cpu: bool) -> dict:
    """Every SpiralConfig field the job sets over its flavor's: Megatron-LM's fusion defaults,
    then every `model.<field>` the user set (model_fields.py refuses the rest), then what the
    job's own keys decide."""
    dtype = DTYPES[cfg.precision]
    settings, _ = fusion_defaults(cfg, on_cpu)
    settings.update(model_fields.as_config_kwargs(model_overrides(cfg)))
    settings.update(
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        sequence_parallel=cfg.sequence_parallel,
        use_cpu_initialization=on_cpu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        transformer_impl=backend(cfg, on_cpu),
    )
    if cfg.fp8 is not None:
        settings.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe)
    return settings


def model_config(cfg: TrainingConfig, on_cpu: bool) -> SpiralConfig:
    """The one SpiralConfig of the job: flavor + settings. Every rank builds its stage with it,
    and model_args.json records its function."""
    return flavors.get(cfg.model["flavor"]).config(**model_settings(cfg, on_cpu))


def ddp_config(cfg: TrainingConfig):
    """Megatron DDP as Megatron-LM runs it on GPUs: gradient reduction overlapped with the
    backward pass and, with the distributed optimizer, the parameter all-gather overlapped with
    the next forward (`--overlap-grad-reduce --overlap-param-gather`); gradients reduced in fp32."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True,
        overlap_param_gather=cfg.use_distributed_optimizer,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )


def build(cfg: TrainingConfig, vocab_size: int, on_cpu: bool) -> Components:
    """This pipeline stage of the SpiralGPTModel in Megatron DDP, Megatron's Adam and
    OptimizerParamScheduler. Weights are drawn layout-independently from `cfg.seed`."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from spiral_megatron.job.run import grad_norm

    config = model_config(cfg, on_cpu)
    args = make_model_args(config, cfg, vocab_size)
    _, notes = fusion_defaults(cfg, on_cpu)
    if notes and torch.distributed.get_rank() == 0:
        print("\n".join(notes), flush=True)
    module = make_model(config, args, backend=backend(cfg, on_cpu), pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage())
    if not on_cpu:
        module.cuda(torch.cuda.current_device())
    init.initialize(module, cfg.seed)
    if cfg.load:  # e.g. a checkpoint from tools/quantize.py keeps its quantizers (QAT)
        extra_state.restore(module, cfg.load)
    config = module.config
    model = DistributedDataParallel(config, ddp_config(cfg), module)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", loss_scale=cfg.loss_scale,
        params_dtype=DTYPES[cfg.precision], use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    # Megatron's optimizers, chained with a gradient norm that never reads the device (grad_norm.py)
    optimizer = grad_norm.fused_norm(get_megatron_optimizer(opt_config, [model]))
    samples = cfg.global_batch_size  # Megatron's scheduler counts samples
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=warmup_iters(cfg) * samples,
        lr_decay_steps=(cfg.lr_decay_iters or cfg.train_iters) * samples,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters * samples, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=cfg.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
    )
    # The schedules find these hooks on the model config, as in Megatron-LM's training.py.
    # Ours wraps Megatron's and also sums the gradients of the core's replicas over stages.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    config.grad_scale_func = optimizer.scale_loss
    return Components(model, module, optimizer, scheduler, args)


def sync_params(model) -> None:
    """Finish the deferred parameter all-gather now (before a checkpoint is saved).

    With `overlap_param_gather` the optimizer step updates only this rank's shard and the
    all-gather of the updated weights runs in the next forward's pre-hooks, so between a step
    and the next forward the full weights are stale (Megatron-LM's `force_param_sync`)."""
    if model.ddp_config.overlap_param_gather:
        model.start_param_sync(force_sync=True)

