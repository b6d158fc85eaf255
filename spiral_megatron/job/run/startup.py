"""A job's start-up, before any compute: the process group, the checks every rank agrees on
(one rank reports an error, once), the save folder's lock and recovery, the iteration to resume
from (refused in one line if this run cannot read it), the data source and tokenizer."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from spiral_megatron import parallel
from spiral_megatron.job.checkpoint import checkpointing
from spiral_megatron.job.checkpoint.checkpoint_files import same_folder
from spiral_megatron.job.checkpoint.folder_lock import FolderLock
from spiral_megatron.job.data import datasets as data
from spiral_megatron.job.run import console, fatal
from spiral_megatron.job.run.metrics import summary_writer_class
from spiral_megatron.job.settings import checks
from spiral_megatron.job.settings.config import ConfigError, TrainingConfig
from spiral_megatron.job.settings.resolve import Resolved


@dataclass
class Layout:
    """This process's place in the run."""

    rank0: bool
    world_size: int
    dp_size: int
    dp_rank: int
    on_cpu: bool


def start(job: Resolved) -> Layout:
    """torch.distributed and Megatron's groups; then every check that needs the world size."""
    from megatron.core import parallel_state

    cfg, on_cpu = job.keys, job.on_cpu
    backend = None if cfg.backend == "auto" else cfg.backend
    try:  # every rank finds the same: rank 0 says it
        if on_cpu and backend == "nccl":
            raise ConfigError("backend 'nccl' needs CUDA GPUs; this machine has none (use gloo or auto)")
        checks.check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before Megatron asserts on it
    except ConfigError as e:
        raise _reported(e, by_me=os.environ.get("RANK", "0") == "0")
    parallel.initialize(cfg.tensor_parallel, cfg.pipeline_parallel, seed=cfg.seed, backend=backend,
                        timeout_minutes=cfg.distributed_timeout_minutes)
    dp = checks.check_world(cfg, dist.get_world_size())
    return Layout(dist.get_rank() == 0, dist.get_world_size(), dp,
                  parallel_state.get_data_parallel_rank(), on_cpu)


def on_rank0(layout: Layout, fn):
    """`fn()` on rank 0 only; its result, or the ConfigError it raised, on every rank."""
    outcome = [None]
    if layout.rank0:
        try:
            outcome[0] = ("ok", fn())
        except ConfigError as e:
            outcome[0] = ("error", e)
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise _reported(value, by_me=layout.rank0)
    return value


def agreed(fn):
    """`fn()` on every rank; if any rank raises a ConfigError, every rank raises the first one
    (by rank) and only its own rank reports it: an error is printed once per job, not followed
    by the other ranks' broken-connection tracebacks. Whatever in `fn` can raise a ConfigError
    on some ranks only must come before its collectives, if any."""
    result, error = None, None
    try:
        result = fn()
    except ConfigError as e:
        error = e
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    owner = next((rank for rank, e in enumerate(errors) if e is not None), None)
    if owner is not None:
        raise _reported(errors[owner], by_me=owner == dist.get_rank())
    return result


def _reported(error: ConfigError, by_me: bool) -> ConfigError:
    """`error`, marked as printed by another rank unless `by_me` (examples/pretrain_spiral.py)."""
    error.reported_elsewhere = not by_me
    return error


@dataclass
class Preflight:
    """What preflight found: the lock held on the save folder (rank 0), the iteration to resume,
    the folder it is in, and whether only its weights start a fine-tuning run (--finetune)."""

    lock: Optional[FolderLock]
    resume_from: Optional[int]
    resume_root: Optional[str] = None
    finetune: bool = False


def preflight(job: Resolved, layout: Layout, held: Preflight) -> None:
    """Refuse, before any compute, what would fail later: fp8 without TE, bad folders, a save
    folder in use; fills `held` (the caller releases its lock whatever happens)."""
    cfg = job.keys
    agreed(lambda: every_rank_checks(cfg, layout))
    if cfg.save:
        if layout.rank0:  # losing the lock to another job ends this one (folder_lock.py)
            held.lock = FolderLock(cfg.save, on_lost=lambda line: fatal.stop(f"pretrain_spiral: error: {line}"),
                                   say=lambda line: print(line, flush=True))
        warning = on_rank0(layout, lambda: held.lock.acquire())
        recovered = on_rank0(layout, lambda: checkpointing.recover(cfg.save))
        for line in (warning, recovered):
            if line and layout.rank0:
                print(line, flush=True)
        on_rank0(layout, lambda: check_resumes_save(cfg))
    if cfg.load:
        held.resume_root, held.finetune, held.resume_from = on_rank0(
            layout, lambda: resumable(job, checkpointing.parallel_layout()))
        if held.resume_from is None and cfg.exit_on_missing_checkpoint:
            raise ConfigError(f"exit_on_missing_checkpoint: load {cfg.load!r} holds no checkpoint (nothing to resume; "
                              f"leave the flag out to start from scratch)")
        if held.resume_from is None and layout.rank0:
            print(f"load {cfg.load!r} is the --save folder and holds no checkpoint yet: starting from "
                  f"scratch (the first launch of a job that requeues with the same command)", flush=True)
    if layout.rank0 and cfg.tensorboard_dir:
        try:
            summary_writer_class(cfg.tensorboard_dir)
        except ImportError as e:  # the message says what to install
            raise ConfigError(str(e)) from None


def every_rank_checks(cfg: TrainingConfig, layout: Layout) -> None:
    """What each rank checks for itself (no collectives): fp8 support, flags, a writable folder."""
    if cfg.fp8 is not None:
        from spiral_megatron.model.layer_specs import have_transformer_engine

        if layout.on_cpu or not have_transformer_engine():
            raise ConfigError(f"fp8 {cfg.fp8!r} needs CUDA GPUs and Transformer Engine")
    if cfg.override_opt_param_scheduler and cfg.use_checkpoint_opt_param_scheduler:
        raise ConfigError("override_opt_param_scheduler and use_checkpoint_opt_param_scheduler are both set; "
                          "choose one (as Megatron-LM)")
    if cfg.save:
        checkpointing.check_writable(cfg.save)


def resume_root(cfg: TrainingConfig) -> tuple:
    """(folder to load, fine-tune from its weights?). --finetune (Megatron-LM's) starts from
    --load's weights at iteration 0, but only on the first launch: once --save holds this run's
    own checkpoint, the same command resumes that instead (as Bridge's pretrained_checkpoint)."""
    if not cfg.finetune:
        return cfg.load, False
    if cfg.save and same_folder(cfg.save, cfg.load):
        raise ConfigError(f"finetune: --load {cfg.load!r} is the --save folder; fine-tuning starts from another "
                          f"run's checkpoint (--load) and saves its own in --save")
    if cfg.save and checkpointing.latest_iteration(cfg.save) is not None:
        print(f"finetune: {cfg.save!r} holds this fine-tuning run's checkpoint: resuming it ({cfg.load!r} "
              f"gave the first launch its weights)", flush=True)  # rank 0's (`resumable`)
        return cfg.save, False
    return cfg.load, True


def resumes_save(cfg: TrainingConfig) -> bool:
    """Whether the command resumes its --save folder once that holds a checkpoint: it loads it,
    or fine-tunes (resume_root)."""
    return bool(cfg.save) and (cfg.finetune or (cfg.load is not None and same_folder(cfg.load, cfg.save)))


def check_resumes_save(cfg: TrainingConfig) -> None:
    """A --save folder that holds a checkpoint is resumed, never written over: a run that starts
    elsewhere (no --load: a relaunch without it after a preemption; another --load) is refused
    before anything is built. Megatron-LM resumes from --load only and would write its
    iterations over the folder's."""
    held = checkpointing.latest_iteration(cfg.save)
    if held is None or resumes_save(cfg):
        return
    start = "from scratch (no --load)" if not cfg.load else f"from --load {cfg.load!r}"
    raise ConfigError(f"save {cfg.save!r} holds iteration {held} of an earlier run, which this run, starting {start}, "
                      f"would write over: pass --load {cfg.save} to resume it, or another --save folder")


def resumable(job: Resolved, layout: dict) -> tuple:
    """(folder, fine-tune from its weights?, the iteration it resumes from: None = from
    scratch), on rank 0; refused in one line before anything is built if this run cannot read
    it (checkpoint_files, bucket_layout)."""
    from spiral_megatron.job.checkpoint import bucket_layout, checkpoint_files

    cfg = job.keys
    root, finetune = resume_root(cfg)
    load_optim = not (cfg.no_load_optim or finetune)
    iteration = checkpoint_files.find_resumable(root, cfg.save, job_files(cfg))
    if iteration is not None:
        record = checkpoint_files.check_fits(root, iteration, layout, cfg.use_distributed_optimizer,
                                             load_optim=load_optim)
        if record.get("pre_marker"):
            print(f"load {str(root)!r}: iteration {iteration} was saved before {checkpoint_files.MARKER} "
                  f"existed; it is complete (Megatron's metadata, every shard, model_args.json)", flush=True)
        if load_optim:
            bucket_layout.check(root, iteration, job, layout["dp"])
    return root, finetune, iteration


def job_files(cfg: TrainingConfig) -> tuple:
    """What this job writes into its --save folder before its first checkpoint."""
    names = [console.CONFIG_FILE, console.WARNINGS_LOG]
    for path in (cfg.log_json, cfg.tensorboard_dir):
        if path and cfg.save and Path(path).resolve().parent == Path(cfg.save).resolve():
            names.append(Path(path).name)
    return tuple(names)


def prepare_data(job: Resolved, layout: Layout):
    """(source, tokenizer); rank 0 builds the embedded corpus first when it is the data."""
    source = agreed(lambda: data.resolve(job.data, build_default=True) if layout.rank0 else None)
    if not layout.rank0:
        source = data.resolve(job.data, build_default=False)
    return source, data.load_tokenizer(source, job.data.vocab_size)
