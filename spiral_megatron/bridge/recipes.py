"""Recipes: Megatron-Bridge's ConfigContainer for a SpiralFormer flavor, with the project's defaults.

A recipe is the project's own job configuration translated: `job_config(flavor, **keys)`
resolves the job's keys (spiral_megatron/job/settings/keys.py, the same checks and aliases as
`examples/pretrain_spiral.py`) with the flavor's defaults (FLAVOR_KEYS, which are
examples/configs/<flavor>.yaml's; a test keeps them equal), and `container(cfg)` maps every
key to its Bridge field (JOB_TO_BRIDGE, also the table of docs/BRIDGE.md). So a recipe trains
the model the job trains, with the job's data, tokenizer, optimizer, schedule and seed.
"""

import dataclasses
from typing import Any, Dict

import torch
from megatron.bridge.training.config import (
    CheckpointConfig, ConfigContainer, DistributedDataParallelConfig, DistributedInitConfig, GPTDatasetConfig,
    LoggerConfig, OptimizerConfig, RerunStateMachineConfig, RNGConfig, SchedulerConfig, TokenizerConfig,
    TrainingConfig, ValidationConfig)

from spiral_megatron.config import flavors
from spiral_megatron.bridge.provider import SpiralModelProvider
from spiral_megatron.job import build
from spiral_megatron.job.data import datasets as data, default_data
from spiral_megatron.job.settings import model_fields
from spiral_megatron.job.settings import config as job
from spiral_megatron.job.settings.keys import seq_length

# The paper's training setup (docs/MODEL.md section 7), as examples/configs/spiral-*.yaml.
_PAPER = dict(seq_length=4096, global_batch_size=512, train_iters=119209, lr_warmup_fraction=0.01,
              lr_decay_style="cosine", weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0,
              precision="bf16", use_distributed_optimizer=True, make_vocab_size_divisible_by=128,
              log_interval=10, eval_interval=1000, eval_iters=20, save_interval=1000)
_SIZES = {"160m": dict(lr=6e-4, min_lr=6e-5, micro_batch_size=8), "410m": dict(lr=3e-4, min_lr=3e-5, micro_batch_size=8),
          "1.4b": dict(lr=2e-4, min_lr=2e-5, micro_batch_size=4)}
_DEBUG = dict(seq_length=128, lr_warmup_fraction=0.0667, eval_iters=5, save_interval=100)  # debug-cpu.yaml

# Job keys of each flavor over TrainingConfig's defaults: debug-size flavors train as
# examples/configs/debug-cpu.yaml, paper sizes as examples/configs/spiral-<size>.yaml.
FLAVOR_KEYS: Dict[str, Dict[str, Any]] = {
    name: dict(_DEBUG) if name.endswith("debug") else dict(_PAPER, **_SIZES[name.rsplit("-", 1)[1]])
    for name in flavors.names()
}

# Job key -> the Bridge field it sets (docs/BRIDGE.md lists this table).
JOB_TO_BRIDGE = {
    "model": "model.<field> (SpiralModelProvider: the flavor's SpiralConfig fields)",
    "seq_length": "model.seq_length, dataset.seq_length",
    "tensor_parallel": "model.tensor_model_parallel_size",
    "pipeline_parallel": "model.pipeline_model_parallel_size",
    "sequence_parallel": "model.sequence_parallel",
    "micro_batch_size": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size",
    "train_iters": "train.train_iters",
    "exit_interval": "train.exit_interval",
    "lr": "optimizer.lr",
    "min_lr": "optimizer.min_lr",
    "lr_warmup_iters": "scheduler.lr_warmup_iters",
    "lr_warmup_fraction": "scheduler.lr_warmup_fraction (of the decay steps, as the job's)",
    "lr_decay_iters": "scheduler.lr_decay_iters",
    "lr_decay_style": "scheduler.lr_decay_style",
    "weight_decay": "optimizer.weight_decay, scheduler.start_weight_decay, scheduler.end_weight_decay",
    "adam_beta1": "optimizer.adam_beta1",
    "adam_beta2": "optimizer.adam_beta2",
    "adam_eps": "optimizer.adam_eps",
    "clip_grad": "optimizer.clip_grad",
    "precision": "mixed_precision (bf16_mixed, fp16_mixed), model.params_dtype, optimizer.bf16/fp16",
    "loss_scale": "optimizer.loss_scale",
    "fp8": "model.fp8",
    "fp8_recipe": "model.fp8_recipe",
    "use_distributed_optimizer": "optimizer.use_distributed_optimizer, ddp.use_distributed_optimizer",
    "seed": "rng.seed, model.init_seed, dataset.random_seed",
    "data_path": "dataset.blend (None: the embedded corpus, built on first use)",
    "train_data_path": "dataset.blend_per_split[0]",
    "valid_data_path": "dataset.blend_per_split[1]",
    "mock_data": "dataset.blend None with tokenizer NullTokenizer",
    "split": "dataset.split (None: the job's choice for the data, printed)",
    "tokenizer": "tokenizer.tokenizer_model (HuggingFaceTokenizer)",
    "tokenizer_vocab_size": "tokenizer.vocab_size (mock data), the embedded corpus's BPE",
    "make_vocab_size_divisible_by": "model.make_vocab_size_divisible_by",
    "cache_dir": "dataset.path_to_cache (<cache>/indices)",
    "log_interval": "logger.log_interval",
    "eval_interval": "validation.eval_interval",
    "eval_iters": "validation.eval_iters",
    "save": "checkpoint.save",
    "save_interval": "checkpoint.save_interval",
    "load": "checkpoint.load",
    "async_save": "checkpoint.async_save",
    "no_load_optim": "checkpoint.load_optim (negated)",
    "no_load_rng": "checkpoint.load_rng (negated)",
    "dist_ckpt_optim_fully_reshardable": "checkpoint.dist_ckpt_optim_fully_reshardable",
    "override_opt_param_scheduler": "scheduler.override_opt_param_scheduler",
    "use_checkpoint_opt_param_scheduler": "scheduler.use_checkpoint_opt_param_scheduler",
    "check_for_spiky_loss": "rerun_state_machine.check_for_spiky_loss",
    "tensorboard_dir": "logger.tensorboard_dir",
    "backend": "dist.distributed_backend",
    "num_workers": "dataset.num_workers",
}
# Job keys with no Bridge field: the job's own console, checks and files.
JOB_ONLY = ("valid_seed", "check_for_large_grads", "log_json", "peak_tflops", "check_memory", "print_config")


def job_config(flavor: str = "debug", **keys) -> job.TrainingConfig:
    """The project's job configuration of `flavor` (its FLAVOR_KEYS) with `keys` (job keys or
    their Megatron-LM aliases) over it, checked as the job checks it."""
    flavors.get(flavor)  # a ValueError lists the known flavors
    cfg = job.apply(job.TrainingConfig(), {"model": flavor, "save": f"checkpoints/bridge-{flavor}",
                                           **FLAVOR_KEYS[flavor]})
    cfg = job.apply(cfg, keys)
    cfg = job.resolve_tokenizer(cfg, explicit_vocab="tokenizer_vocab_size" in keys)
    cfg = dataclasses.replace(cfg, model=model_fields.typed(cfg.model))
    job.check(cfg)
    return cfg


def pretrain_config(flavor: str = "debug", **keys) -> ConfigContainer:
    """Bridge's ConfigContainer for training `flavor` with the project's defaults; `keys` are
    job keys (`tensor_parallel=2`, `data_path=[...]`, `model={"flavor": ..., field: value}`).
    Bridge's own overrides apply to the container afterwards (examples/bridge/pretrain_spiral.py).
    The embedded corpus, when used, is built here on first use (cached)."""
    return container(job_config(flavor, **keys))


def container(cfg: job.TrainingConfig) -> ConfigContainer:
    """The ConfigContainer of a job configuration (JOB_TO_BRIDGE)."""
    on_cpu = not torch.cuda.is_available()
    seq = seq_length(cfg)
    dtype = build.DTYPES[cfg.precision]
    return ConfigContainer(
        model=_model(cfg, on_cpu, seq),
        train=TrainingConfig(train_iters=cfg.train_iters, global_batch_size=cfg.global_batch_size,
                             micro_batch_size=cfg.micro_batch_size, exit_interval=cfg.exit_interval),
        validation=ValidationConfig(eval_interval=cfg.eval_interval, eval_iters=cfg.eval_iters if cfg.eval_interval else 0),
        optimizer=OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad, bf16=cfg.precision == "bf16",
            fp16=cfg.precision == "fp16", loss_scale=cfg.loss_scale, params_dtype=dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer),
        scheduler=SchedulerConfig(
            lr_decay_style=cfg.lr_decay_style, lr_warmup_fraction=cfg.lr_warmup_fraction,
            lr_warmup_iters=cfg.lr_warmup_iters if cfg.lr_warmup_fraction is None else 0, lr_decay_iters=cfg.lr_decay_iters,
            lr_warmup_init=0.0, start_weight_decay=cfg.weight_decay, end_weight_decay=cfg.weight_decay,
            weight_decay_incr_style="constant", override_opt_param_scheduler=cfg.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=cfg.use_checkpoint_opt_param_scheduler),
        ddp=_ddp(cfg),
        dataset=_dataset(cfg, seq),
        tokenizer=_tokenizer(cfg),
        logger=LoggerConfig(log_interval=cfg.log_interval, tensorboard_dir=cfg.tensorboard_dir),
        checkpoint=CheckpointConfig(
            save=cfg.save, load=cfg.load if cfg.load is not None else cfg.save, save_interval=cfg.save_interval,
            ckpt_format="torch_dist", async_save=cfg.async_save, load_optim=not cfg.no_load_optim,
            load_rng=not cfg.no_load_rng, dist_ckpt_optim_fully_reshardable=cfg.dist_ckpt_optim_fully_reshardable),
        rng=RNGConfig(seed=cfg.seed),
        rerun_state_machine=RerunStateMachineConfig(check_for_spiky_loss=cfg.check_for_spiky_loss),
        dist=DistributedInitConfig(distributed_backend=_backend(cfg, on_cpu)),
        mixed_precision={"bf16": "bf16_mixed", "fp16": "fp16_mixed"}.get(cfg.precision),
    )


def _model(cfg: job.TrainingConfig, on_cpu: bool, seq: int) -> SpiralModelProvider:
    """The job's SpiralConfig fields (flavor, Megatron-LM's fusion defaults, `model.<field>`,
    layout, precision, backend: training/build.model_settings), deferred for Bridge."""
    fields = {**flavors.get(cfg.model["flavor"]).model, **build.model_settings(cfg, on_cpu)}
    return SpiralModelProvider(**fields, seq_length=seq, init_seed=cfg.seed,
                               make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)


def _ddp(cfg: job.TrainingConfig) -> DistributedDataParallelConfig:
    """The job's Megatron DDP settings (training/build.ddp_config) in Bridge's class."""
    ddp = build.ddp_config(cfg)
    return DistributedDataParallelConfig(**{f.name: getattr(ddp, f.name) for f in dataclasses.fields(ddp) if f.init})


def _dataset(cfg: job.TrainingConfig, seq: int) -> GPTDatasetConfig:
    """The job's data: its blends, and the split it would choose for them (data.check)."""
    source = data.resolve(cfg, build_default=True)
    split = None
    if not source.whole:
        split = data.check(cfg, source, data.load_tokenizer(source, cfg.tokenizer_vocab_size), seq)
    return GPTDatasetConfig(
        seq_length=seq, random_seed=cfg.seed, blend=None if source.whole else source.train,
        blend_per_split=[source.train, source.valid, None] if source.whole else None, split=split,
        path_to_cache=str(default_data.cache_root(cfg.cache_dir) / "indices"), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, num_workers=cfg.num_workers, dataloader_type="single")


def _tokenizer(cfg: job.TrainingConfig) -> TokenizerConfig:
    source = data.resolve(cfg, build_default=False)
    if source.tokenizer_path is None:  # mock data
        return TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=cfg.tokenizer_vocab_size)
    return TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(source.tokenizer_path))


def _backend(cfg: job.TrainingConfig, on_cpu: bool) -> str:
    return {"auto": "gloo" if on_cpu else "nccl"}.get(cfg.backend, cfg.backend)
