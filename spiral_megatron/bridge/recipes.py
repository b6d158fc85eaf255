"""Recipes: Megatron-Bridge's ConfigContainer for a SpiralFormer flavor, with the project's defaults.

A recipe is the project's own job translated: `resolved_job(flavor, **keys)` resolves the job's
keys (spiral_megatron/job/settings/, the same checks and aliases as `examples/pretrain_spiral.py`)
over the flavor's defaults (FLAVOR_KEYS, which are examples/configs/<flavor>.yaml's; a test keeps
them equal) into the job's one `Resolved`, and `container(job)` maps what it resolved to Bridge's
fields (JOB_TO_BRIDGE, also the table of docs/BRIDGE.md). So a recipe trains the model the job
trains, with the job's data, tokenizer, optimizer, schedule and seed.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict

from megatron.bridge.training.config import (
    CheckpointConfig, ConfigContainer, DistributedDataParallelConfig, DistributedInitConfig, GPTDatasetConfig,
    LoggerConfig, OptimizerConfig, RerunStateMachineConfig, RNGConfig, SchedulerConfig, TokenizerConfig,
    TrainingConfig, ValidationConfig)

from spiral_megatron.bridge.provider import SpiralModelProvider
from spiral_megatron.config import flavors
from spiral_megatron.job.data import dataset_check, datasets as data, default_data
from spiral_megatron.job.settings import config, resolve
from spiral_megatron.job.settings.keys import FIELDS, ConfigError
from spiral_megatron.job.settings.resolve import Resolved

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
    "rotary_base": "model.rotary_base",
    "rotary_percent": "model.rotary_percent",
    "tensor_parallel": "model.tensor_model_parallel_size",
    "pipeline_parallel": "model.pipeline_model_parallel_size",
    "sequence_parallel": "model.sequence_parallel",
    "micro_batch_size": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size",
    "train_iters": "train.train_iters (None with train_samples: Bridge derives it as the job does)",
    "train_samples": "train.train_samples",
    "exit_interval": "train.exit_interval",
    "exit_duration_in_mins": "train.exit_duration_in_mins",
    "lr": "optimizer.lr",
    "min_lr": "optimizer.min_lr",
    "lr_warmup_iters": "scheduler.lr_warmup_iters",
    "lr_warmup_fraction": "scheduler.lr_warmup_fraction (of the decay samples, not rounded to whole steps as the job's)",
    "lr_decay_iters": "scheduler.lr_decay_iters",
    "lr_warmup_samples": "scheduler.lr_warmup_samples",
    "lr_decay_samples": "scheduler.lr_decay_samples",
    "lr_decay_style": "scheduler.lr_decay_style",
    "lr_wsd_decay_style": "scheduler.lr_wsd_decay_style",
    "lr_wsd_decay_iters": "scheduler.lr_wsd_decay_iters",
    "lr_wsd_decay_samples": "scheduler.lr_wsd_decay_samples",
    "weight_decay": "optimizer.weight_decay, scheduler.start_weight_decay, scheduler.end_weight_decay",
    "adam_beta1": "optimizer.adam_beta1",
    "adam_beta2": "optimizer.adam_beta2",
    "adam_eps": "optimizer.adam_eps",
    "clip_grad": "optimizer.clip_grad",
    "precision": "mixed_precision (bf16_mixed, fp16_mixed), model.params_dtype, optimizer.bf16/fp16",
    "loss_scale": "mixed_precision.loss_scale (Bridge writes it over optimizer.loss_scale)",
    "initial_loss_scale": "mixed_precision.initial_loss_scale",
    "min_loss_scale": "mixed_precision.min_loss_scale",
    "loss_scale_window": "mixed_precision.loss_scale_window",
    "hysteresis": "mixed_precision.hysteresis",
    "ddp_bucket_size": "ddp.bucket_size",
    "fp8": "model.fp8",
    "fp8_recipe": "model.fp8_recipe",
    "use_distributed_optimizer": "optimizer.use_distributed_optimizer, ddp.use_distributed_optimizer",
    "seed": "rng.seed, model.init_seed, dataset.random_seed",
    "data_path": "dataset.blend (None: the embedded corpus, built on first use)",
    "train_data_path": "dataset.blend_per_split[0]",
    "valid_data_path": "dataset.blend_per_split[1]",
    "mock_data": "dataset.blend None with tokenizer NullTokenizer",
    "split": "dataset.split (None: the job's choice for the data, printed; a test part too small for one sample "
             "goes to validation, printed)",
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
    "finetune": "checkpoint.pretrained_checkpoint (--load; checkpoint.load is then --save: Bridge loads the "
                "pretrained weights only while --save holds no checkpoint)",
    "async_save": "checkpoint.async_save",
    "no_load_optim": "checkpoint.load_optim (negated)",
    "no_load_rng": "checkpoint.load_rng (negated)",
    "dist_ckpt_optim_fully_reshardable": "checkpoint.dist_ckpt_optim_fully_reshardable",
    "override_opt_param_scheduler": "scheduler.override_opt_param_scheduler",
    "use_checkpoint_opt_param_scheduler": "scheduler.use_checkpoint_opt_param_scheduler",
    "check_for_spiky_loss": "rerun_state_machine.check_for_spiky_loss",
    "tensorboard_dir": "logger.tensorboard_dir",
    "backend": "dist.distributed_backend",
    "distributed_timeout_minutes": "dist.distributed_timeout_minutes",
    "num_workers": "dataset.num_workers",
    "eod_mask_loss": "dataset.eod_mask_loss",
    "mmap_bin_files": "dataset.mmap_bin_files",
    "lr_warmup_init": "scheduler.lr_warmup_init",
    "manual_gc": "train.manual_gc",
    "manual_gc_interval": "train.manual_gc_interval",
    "manual_gc_eval": "train.manual_gc_eval",
    "empty_unused_memory_level": "train.empty_unused_memory_level",
    "exit_on_missing_checkpoint": "checkpoint.exit_on_missing_checkpoint",
    "log_params_norm": "logger.log_params_norm",
    "log_num_zeros_in_grad": "optimizer.log_num_zeros_in_grad",
}
# Job keys with no Bridge field: the job's own console, checks and files; use_checkpoint_args
# reads a job checkpoint's model_args.json, and Bridge loads no job checkpoint (docs/BRIDGE.md).
JOB_ONLY = ("valid_seed", "check_for_large_grads", "log_json", "peak_tflops", "check_memory", "print_config",
            "use_checkpoint_args", "use_tokenizer_model_from_checkpoint_args")


def resolved_job(flavor: str = "debug", **keys) -> Resolved:
    """The project's job of `flavor` (its FLAVOR_KEYS) with `keys` (job keys or their
    Megatron-LM aliases) over them, resolved and checked as the job resolves it. `config`: a
    job config file (examples/pretrain_spiral.py's --config), its keys over the flavor's."""
    flavors.get(flavor)  # a ValueError lists the known flavors
    path = keys.pop("config", None)
    defaults = config.layered({"model": flavor, "save": f"checkpoints/bridge-{flavor}", **FLAVOR_KEYS[flavor]},
                              config.read_yaml(Path(path)) if path else {})
    resolved = config.keys_of(defaults, keys)
    for key in JOB_ONLY:  # read after the aliases are resolved
        if getattr(resolved, key) != FIELDS[key].default:
            raise ConfigError(f"{key} {getattr(resolved, key)!r}: a key of the project's own job, which "
                              f"Megatron-Bridge has no field for (docs/BRIDGE.md); leave it out")
    return resolve.resolve_keys(resolved)


def pretrain_config(flavor: str = "debug", **keys) -> ConfigContainer:
    """Bridge's ConfigContainer for training `flavor` with the project's defaults; `keys` are
    job keys (`tensor_parallel=2`, `data_path=[...]`, `model={"flavor": ..., field: value}`).
    Bridge's own overrides apply to the container afterwards (examples/bridge/pretrain_spiral.py).
    The embedded corpus, when used, is built here on first use (cached)."""
    return container(resolved_job(flavor, **keys))


def container(job: Resolved) -> ConfigContainer:
    """The ConfigContainer of a resolved job (JOB_TO_BRIDGE)."""
    keys = job.keys
    return ConfigContainer(
        model=_model(job),
        train=TrainingConfig(train_iters=None if keys.train_samples else keys.train_iters,
                             train_samples=keys.train_samples, global_batch_size=keys.global_batch_size,
                             micro_batch_size=keys.micro_batch_size, exit_interval=keys.exit_interval,
                             exit_duration_in_mins=keys.exit_duration_in_mins, manual_gc=keys.manual_gc,
                             manual_gc_interval=keys.manual_gc_interval, manual_gc_eval=keys.manual_gc_eval,
                             empty_unused_memory_level=keys.empty_unused_memory_level),
        validation=ValidationConfig(eval_interval=keys.eval_interval,
                                    eval_iters=keys.eval_iters if keys.eval_interval else 0),
        optimizer=_same_fields(OptimizerConfig, job.optimizer),
        scheduler=_scheduler(job),
        ddp=_same_fields(DistributedDataParallelConfig, job.ddp),
        dataset=_dataset(job),
        tokenizer=_tokenizer(job),
        logger=LoggerConfig(log_interval=keys.log_interval, tensorboard_dir=keys.tensorboard_dir,
                            log_params_norm=keys.log_params_norm),
        checkpoint=CheckpointConfig(
            save=keys.save, load=keys.save if keys.finetune or keys.load is None else keys.load,
            pretrained_checkpoint=keys.load if keys.finetune else None, save_interval=keys.save_interval,
            ckpt_format="torch_dist", async_save=keys.async_save, load_optim=not keys.no_load_optim,
            load_rng=not keys.no_load_rng, dist_ckpt_optim_fully_reshardable=keys.dist_ckpt_optim_fully_reshardable,
            exit_on_missing_checkpoint=keys.exit_on_missing_checkpoint),
        rng=RNGConfig(seed=keys.seed),
        rerun_state_machine=RerunStateMachineConfig(check_for_spiky_loss=keys.check_for_spiky_loss),
        dist=DistributedInitConfig(distributed_backend=_backend(job),
                                   distributed_timeout_minutes=keys.distributed_timeout_minutes),
        mixed_precision=_mixed_precision(job),
    )


def _mixed_precision(job: Resolved):
    """Bridge's bf16_mixed / fp16_mixed with the job's loss scaling and gradient-reduce dtype:
    Bridge's MixedPrecisionConfig.setup writes its own fields over the optimizer's and the DDP
    config's (fp16_mixed would reduce gradients in fp16 and reset the loss scaler's keys)."""
    from megatron.bridge.training.mixed_precision import get_mixed_precision_config

    name = {"bf16": "bf16_mixed", "fp16": "fp16_mixed"}.get(job.keys.precision)
    if name is None:
        return None
    opt = job.optimizer
    return dataclasses.replace(get_mixed_precision_config(name), loss_scale=opt.loss_scale,
                               initial_loss_scale=opt.initial_loss_scale, min_loss_scale=opt.min_loss_scale,
                               loss_scale_window=opt.loss_scale_window, hysteresis=opt.hysteresis,
                               grad_reduce_in_fp32=job.ddp.grad_reduce_in_fp32)


def _model(job: Resolved) -> SpiralModelProvider:
    """The arguments of the job's SpiralConfig (flavor | fusion defaults | model.<field> | its
    keys), validated by the provider's finalize() once Bridge's overrides are in."""
    args = job.model_args
    return SpiralModelProvider(**job.model_kwargs, seq_length=job.seq_length, init_seed=job.keys.seed,
                               make_vocab_size_divisible_by=job.keys.make_vocab_size_divisible_by,
                               rotary_base=args.rotary_base, rotary_percent=args.rotary_percent)


def _same_fields(cls, megatron_config):
    """Bridge's subclass `cls` of a Megatron config (DDP, optimizer) with the job's values."""
    return cls(**{f.name: getattr(megatron_config, f.name) for f in dataclasses.fields(megatron_config) if f.init})


def _scheduler(job: Resolved) -> SchedulerConfig:
    """The job's schedule (job/settings/training.py): linear warmup from lr_warmup_init (a fraction of the
    decay, so that it follows an overridden train.train_iters as the job's follows
    --train-iters, or whole steps or samples), decay over lr_decay_iters (None: train_iters, in
    both) or with train_samples over lr_decay_samples (None: train_samples), constant weight
    decay. Bridge does not round a warmup fraction of iterations to whole steps as the job does:
    0.0667 of 300 steps of 16 samples warms up over 320.16 samples, the job's over 320."""
    s, keys = job.schedule, job.keys
    fraction = keys.lr_warmup_fraction is not None
    return SchedulerConfig(
        lr_decay_style=s.lr_decay_style, lr_warmup_fraction=keys.lr_warmup_fraction,
        lr_warmup_iters=0 if fraction else keys.lr_warmup_iters,
        lr_warmup_samples=0 if fraction else keys.lr_warmup_samples,
        lr_warmup_init=s.init_lr, lr_decay_iters=keys.lr_decay_iters, lr_decay_samples=keys.lr_decay_samples,
        lr_wsd_decay_style=s.lr_wsd_decay_style, lr_wsd_decay_iters=keys.lr_wsd_decay_iters,
        lr_wsd_decay_samples=keys.lr_wsd_decay_samples,
        start_weight_decay=s.start_wd, end_weight_decay=s.end_wd, weight_decay_incr_style=s.wd_incr_style,
        override_opt_param_scheduler=s.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=s.use_checkpoint_opt_param_scheduler)


def _dataset(job: Resolved) -> GPTDatasetConfig:
    """The job's data: its blends, and the split it would choose for them (data.check)."""
    settings = job.data
    source = data.resolve(settings, build_default=True)
    split = None
    if not source.whole:
        tokenizer = data.load_tokenizer(source, settings.vocab_size)
        split = _with_a_test_split(data.check(settings, source, tokenizer), source, tokenizer, job.seq_length)
    return GPTDatasetConfig(
        seq_length=job.seq_length, random_seed=settings.seed, blend=None if source.whole else source.train,
        blend_per_split=[source.train, source.valid, None] if source.whole else None, split=split,
        path_to_cache=str(default_data.cache_root(settings.cache_dir) / "indices"), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=settings.eod_mask_loss, mmap_bin_files=settings.mmap_bin_files,
        num_workers=job.keys.num_workers, dataloader_type="single")


def _with_a_test_split(split: str, source, tokenizer, seq_length: int) -> str:
    """The job's split for Bridge, which also builds the test split (the job never does). A test
    part too small for one sample hangs Megatron-Core (GPTDataset counts epochs of 0 tokens
    without end), so it goes to validation instead, said in one line: the training documents
    stay the job's. [ours]"""
    train, valid, test = dataset_check.parse_split(split)
    if not test or source.train is None:  # mock data: Megatron's mock datasets fill any split
        return split
    corpora = [dataset_check.open_corpus(prefix, tokenizer) for prefix in source.train[0]]
    try:
        dataset_check.check_splits(corpora, split, ["test"], seq_length + 1)
        return split
    except ConfigError as e:
        ours = f"{train * 1000:.6g},{(valid + test) * 1000:.6g},0"
        if os.environ.get("RANK", "0") == "0":  # every rank resolves the recipe
            print(f"split: {split} leaves {str(e).split(' leaves ', 1)[-1].split(';')[0]}; Megatron-Bridge builds a test "
                  f"split (the job does not) and Megatron-Core cannot build an empty one: {ours} (validation "
                  f"takes the test share, training keeps its documents)", flush=True)
        return ours


def _tokenizer(job: Resolved) -> TokenizerConfig:
    source = data.resolve(job.data, build_default=False)
    if source.tokenizer_path is None:  # mock data
        return TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=job.data.vocab_size)
    return TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(source.tokenizer_path))


def _backend(job: Resolved) -> str:
    return {"auto": "gloo" if job.on_cpu else "nccl"}.get(job.keys.backend, job.keys.backend)
