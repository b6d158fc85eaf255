"""Model, Megatron DDP, optimizer and LR scheduler for a TrainingConfig, all from megatron.core."""

from dataclasses import dataclass

import torch

from spiral_megatron import flavors
from spiral_megatron.layer_specs import have_transformer_engine
from spiral_megatron.model_args import ModelArgs, build_model
from spiral_megatron.training.config import TrainingConfig, model_overrides, seq_length

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# SpiralConfig fields that place the model on the pipeline: not architecture (model_args.json
# leaves them out, so a checkpoint loads at any layout), passed at build time.
PIPELINE_FIELDS = ("loop_placement", "pipeline_split")


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


def make_model_args(cfg: TrainingConfig, vocab_size: int) -> ModelArgs:
    """The architecture (flavor + overrides) as saved in model_args.json."""
    spiral = flavors.get(cfg.model["flavor"]).config(**model_overrides(cfg))
    return ModelArgs.from_config(spiral, vocab_size=padded_vocab_size(vocab_size, cfg),
                                 max_sequence_length=seq_length(cfg))


def runtime_overrides(cfg: TrainingConfig, on_cpu: bool) -> dict:
    """SpiralConfig fields that depend on the run, not the architecture."""
    dtype = DTYPES[cfg.precision]
    runtime = dict(
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        sequence_parallel=cfg.sequence_parallel,
        use_cpu_initialization=on_cpu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
    )
    model = model_overrides(cfg)
    runtime.update({k: model[k] for k in PIPELINE_FIELDS if k in model})
    if cfg.fp8 is not None:
        runtime.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe)
    return runtime


def build(cfg: TrainingConfig, vocab_size: int, on_cpu: bool) -> Components:
    """This pipeline stage of the SpiralGPTModel in Megatron DDP, Megatron's Adam and
    OptimizerParamScheduler."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from spiral_megatron.pipeline import finalize_model_grads

    args = make_model_args(cfg, vocab_size)
    backend = "transformer_engine" if not on_cpu and have_transformer_engine() else "local"
    module = build_model(args, backend=backend, pre_process=parallel_state.is_pipeline_first_stage(),
                         post_process=parallel_state.is_pipeline_last_stage(),
                         **runtime_overrides(cfg, on_cpu))
    if cfg.load:  # a checkpoint from tools/quantize.py keeps its quantizers (QAT)
        from spiral_megatron.quantization.checkpoint import restore_for_training

        restore_for_training(module, cfg.load)
    if not on_cpu:
        module.cuda(torch.cuda.current_device())
    config = module.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.use_distributed_optimizer
    )
    model = DistributedDataParallel(config, ddp_config, module)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", loss_scale=cfg.loss_scale,
        params_dtype=DTYPES[cfg.precision], use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    samples = cfg.global_batch_size  # Megatron's scheduler counts samples
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * samples,
        lr_decay_steps=(cfg.lr_decay_iters or cfg.train_iters) * samples,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters * samples, wd_incr_style="constant",
    )
    # The schedules find these hooks on the model config, as in Megatron-LM's training.py.
    # Ours wraps Megatron's and also sums the gradients of the core's replicas over stages.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    config.grad_scale_func = optimizer.scale_loss
    return Components(model, module, optimizer, scheduler, args)
