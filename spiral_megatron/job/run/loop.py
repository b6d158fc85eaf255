"""The training run: start the process, check everything, build, (resume,) train, evaluate, save.

Failure handling, as Megatron-LM's: a non-finite loss or gradient norm (and, when asked, a
spiky loss or gradient norm: divergence.py) stops the run naming the iteration, before that
step is saved; the message says what the latest checkpoint holds (its step's loss, gradient
norm, largest weight) and whether its weights are the ones that just failed. Weights that are
not finite are never saved. SIGTERM or SIGINT saves a checkpoint at the end of the current
step and exits cleanly. One job at a time saves into a folder (folder_lock.py).
"""

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from spiral_megatron import parallel
from spiral_megatron.errors import SpiralError
from spiral_megatron.parallel import pipeline_plan
from spiral_megatron.job.checkpoint import checkpointing, extra_state
from spiral_megatron.job.settings import checks
from spiral_megatron.job.run import console, divergence, fatal, memory, step
from spiral_megatron.job.data import datasets as data
from spiral_megatron.job.build import Components, build
from spiral_megatron.job.settings.config import ConfigError, TrainingConfig
from spiral_megatron.job.settings.resolve import Resolved
from spiral_megatron.job.checkpoint.folder_lock import FolderLock
from spiral_megatron.job.run.metrics import Logger, device_peak_tflops, tensorboard_writer


class NonFiniteLoss(SpiralError, RuntimeError):
    """The loss, the gradient norm or the weights became NaN or inf (or spiked, when checked)."""


class ExitSignal:
    """Records SIGTERM/SIGINT; every rank learns of it at the same step (in the step's
    all-reduce, step.StepFlags)."""

    def __init__(self):
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True


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
    parallel.initialize(cfg.tensor_parallel, cfg.pipeline_parallel, seed=cfg.seed, backend=backend)
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
    """What preflight found: the lock held on the save folder (rank 0), the iteration to resume."""

    lock: Optional[FolderLock]
    resume_from: Optional[int]


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
    if cfg.load:
        held.resume_from = on_rank0(layout, lambda: resumable(job, checkpointing.parallel_layout()))
        if held.resume_from is None and layout.rank0:
            print(f"load {cfg.load!r} is the --save folder and holds no checkpoint yet: starting from "
                  f"scratch (the first launch of a job that requeues with the same command)", flush=True)
    if layout.rank0 and cfg.tensorboard_dir:
        try:
            tensorboard_writer(cfg.tensorboard_dir).close()
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


def resumable(job: Resolved, layout: dict) -> Optional[int]:
    """The iteration `--load` resumes from (None: from scratch), refused in one line before
    anything is built if this run cannot read it (checkpoint_files, bucket_layout)."""
    from spiral_megatron.job.checkpoint import bucket_layout, checkpoint_files

    cfg = job.keys

    iteration = checkpoint_files.find_resumable(cfg.load, cfg.save, job_files(cfg))
    if iteration is not None:
        record = checkpoint_files.check_fits(cfg.load, iteration, layout, cfg.use_distributed_optimizer,
                                             load_optim=not cfg.no_load_optim)
        if record.get("pre_marker"):
            print(f"load {cfg.load!r}: iteration {iteration} was saved before {checkpoint_files.MARKER} "
                  f"existed; it is complete (Megatron's metadata, every shard, model_args.json)", flush=True)
        if not cfg.no_load_optim:
            bucket_layout.check(cfg.load, iteration, job, layout["dp"])
    return iteration


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


class Trainer:
    """Holds the run's state between steps: iteration, consumed samples, data iterators."""

    def __init__(self, job: Resolved, layout: Layout, parts: Components, tokenizer,
                 datasets, logger: Logger):
        cfg = job.keys
        self.cfg, self.layout, self.parts, self.tokenizer, self.logger = cfg, layout, parts, tokenizer, logger
        self.train_ds, self.valid_ds = datasets
        self.seq_length = job.seq_length
        self.num_microbatches = cfg.global_batch_size // (cfg.micro_batch_size * layout.dp_size)
        self.iteration, self.consumed_samples, self.last_saved = 0, 0, None
        self.last_stats, self.saved_stats = {}, {}  # iteration -> what its checkpoint was saved after
        self.background = checkpointing.BackgroundSaves(layout.rank0) if cfg.async_save and cfg.save else None
        self.spiky_loss = divergence.LargeValueCheck() if cfg.check_for_spiky_loss else None
        self.large_grads = divergence.LargeValueCheck() if cfg.check_for_large_grads else None
        self.flags = step.StepFlags(layout.dp_size)  # each step's loss and exit flag, read a step late
        self.settled, self.exit_requested = None, False
        self.skipped = 0  # steps the optimizer skipped since the last log line (fp16 overflows)

    def batches(self, dataset, start: int):
        return data.micro_batches(dataset, start, self.cfg.micro_batch_size, self.layout.dp_rank,
                                  self.layout.dp_size, self.cfg.num_workers)

    def resume(self) -> None:
        restored = checkpointing.load(self.cfg.load, self.parts, self.cfg, self.tokenizer)
        self.iteration = restored.iteration
        if restored.weights_only:
            # No data position saved: assume Megatron's sampler order up to this iteration.
            self.consumed_samples = restored.iteration * self.cfg.global_batch_size
            if self.layout.rank0:
                print(f"loaded model weights only from {self.cfg.load} (iteration {self.iteration}): "
                      f"it holds no optimizer, LR scheduler or data position; the optimizer and the "
                      f"LR schedule start fresh, data from sample {self.consumed_samples}", flush=True)
            return
        self.consumed_samples = restored.consumed_samples
        self.saved_stats[self.iteration] = restored.extra or {}
        if self.cfg.save and Path(self.cfg.save).resolve() == Path(self.cfg.load).resolve():
            self.last_saved = self.iteration  # it is there already: never rewrite it
        if self.layout.rank0:
            print(f"resumed from {self.cfg.load} at iteration {self.iteration} "
                  f"({self.consumed_samples} samples consumed)", flush=True)

    def save(self) -> None:
        if not self.cfg.save or self.last_saved == self.iteration:
            return
        stats = dict(self.last_stats, max_abs_weight=self.max_abs_weight())
        if not math.isfinite(stats["max_abs_weight"]):
            raise NonFiniteLoss(self.stopped(f"weights not finite ({stats['max_abs_weight']})", self.iteration))
        folder = checkpointing.save(self.cfg.save, self.iteration, self.consumed_samples, self.parts,
                                    self.cfg, self.tokenizer, self.background, stats)
        self.last_saved, self.saved_stats[self.iteration] = self.iteration, stats
        if self.layout.rank0 and self.background is None:
            print(f"saved checkpoint {folder}", flush=True)

    def finish_saves(self) -> None:
        """Wait for background saves and publish them (a collective)."""
        if self.background is not None:
            self.background.finalize(blocking=True)

    def max_abs_weight(self) -> float:
        """The largest |weight| over all ranks (what a diverged checkpoint shows first); NaN
        if any weight is NaN."""
        return divergence.largest_abs_weight(self.parts.module.parameters())

    def stopped(self, what: str, iteration: int) -> str:
        """`what` happened at `iteration` (this one or the one before, see step.StepFlags): say
        so, and what the latest checkpoint holds."""
        self.finish_saves()
        head = f"{what} at iteration {iteration}: stopping, this step is not saved"
        if not self.cfg.save:
            return head + " (no --save folder)"
        latest = checkpointing.latest_iteration(self.cfg.save)
        if latest is None:
            return f"{head}; no checkpoint in {self.cfg.save}"
        stats = self.saved_stats.get(latest)
        held = "" if not stats else (
            f" (saved after a step of loss {stats.get('loss', float('nan')):.4g}, grad norm "
            f"{stats.get('grad_norm') or float('nan'):.3g}, largest |weight| {stats['max_abs_weight']:.3g})")
        line = f"{head}; latest checkpoint: iteration {latest} in {self.cfg.save}{held}"
        if latest == iteration - 1:  # this step's loss was computed on exactly those weights
            earlier = sorted(int(p.name[5:]) for p in Path(self.cfg.save).glob("iter_*")
                             if p.name[5:].isdigit() and int(p.name[5:]) < latest)
            line += ("; its weights are the ones that gave this step's values, so it is not a good "
                     "checkpoint; the one before it: "
                     + (f"iteration {earlier[-1]}" if earlier else "none"))
        return line

    def evaluate(self) -> float:
        return step.evaluate(self.parts, self.batches(self.valid_ds, 0), self.cfg.eval_iters,
                             self.num_microbatches, self.seq_length, self.cfg.micro_batch_size)

    def train_one(self, batches, signals: "ExitSignal") -> None:
        """Queue one step; check the previous one, whose values reached the host meanwhile."""
        loss, host_values = step.train_step(self.parts, batches, self.num_microbatches, self.seq_length,
                                            self.cfg.micro_batch_size, self.cfg.global_batch_size)
        self.iteration += 1
        self.consumed_samples += self.cfg.global_batch_size
        self.check(self.flags.swap(self.iteration, loss, signals.received, host_values))

    def settle(self) -> step.Settled:
        """This step's values, checked (a host sync: for log lines, saves and the end)."""
        self.check(self.flags.settle())
        return self.settled

    def check(self, settled: Optional[step.Settled]) -> None:
        """Stop at a non-finite (or spiky, when checked) step; every rank reads the same values."""
        if settled is None:
            return
        values = {"loss": settled.loss, "grad_norm": settled.grad_norm}
        bad = [k for k, v in values.items() if v is not None and not math.isfinite(v)]
        if bad:
            raise NonFiniteLoss(self.stopped(' and '.join(f'{k} {values[k]}' for k in bad), settled.iteration))
        for name, check in (("loss", self.spiky_loss), ("grad_norm", self.large_grads)):
            if check is not None and values[name] is not None and check.check(values[name]):
                raise NonFiniteLoss(self.stopped(f"spiky {name} {values[name]:.4g} (>= {check.describe()})",
                                                 settled.iteration))
        self.settled, self.last_stats = settled, values
        self.skipped += settled.skipped
        self.exit_requested = self.exit_requested or settled.exit_requested

    def run(self, signals: ExitSignal) -> str:
        """Train to exit_interval or train_iters; returns why it stopped."""
        cfg, stop = self.cfg, self.cfg.exit_interval or self.cfg.train_iters
        batches, val_loss = self.batches(self.train_ds, self.consumed_samples), None
        while self.iteration < stop:
            if self.background is not None:
                self.background.finalize(blocking=False)
            started = time.time()
            self.train_one(batches, signals)
            last = self.iteration == stop
            log = self.iteration % cfg.log_interval == 0 or last
            save = bool(cfg.save_interval) and self.iteration % cfg.save_interval == 0
            if log or save:  # never save (nor log) a step whose values are unchecked
                self.settle()
            self.logger.step_done(self.iteration, stop, time.time() - started)
            evaluate = cfg.eval_interval and (self.iteration % cfg.eval_interval == 0 or last)
            val_loss = self.evaluate() if evaluate else None
            if log:
                self.logger.log(self.iteration, self.consumed_samples,
                                dict(vars(self.settled), skipped_iterations=self.skipped), val_loss)
                self.skipped = 0
            elif val_loss is not None:
                self.logger.log_eval(self.iteration, val_loss)
            if save:
                self.save()
            if self.exit_requested:  # seen one step late, by every rank at the same step
                self.settle()
                self.save()
                self.finish_saves()
                return f"exit signal received: stopped after iteration {self.iteration}"
        self.settle()
        self.save()
        self.finish_saves()
        return f"finished iteration {self.iteration}"


def run(job: Resolved, quiet: Optional[console.HeldWarnings] = None) -> str:
    """The whole job; raises ConfigError & co. before compute, NonFiniteLoss during it.
    `quiet`: the caller's harmless-warnings holder, reported once the save folder exists."""
    cfg = job.keys
    layout = start(job)
    held, failed = Preflight(None, None), False
    try:
        preflight(job, layout, held)
        if layout.rank0:
            console.write_config(cfg)
            if cfg.print_config:
                print("resolved config:\n" + cfg.to_yaml(), flush=True)
        source, tokenizer = prepare_data(job, layout)
        seq, gbs = job.seq_length, cfg.global_batch_size
        split = agreed(lambda: data.check(job.data, source, tokenizer))
        # A checkpoint from tools/quantize.py keeps its quantizers (QAT): restored before DDP wraps the module.
        parts = build(job, prepare=lambda module: extra_state.restore(module, cfg.load) if cfg.load else None)
        if cfg.check_memory:
            memory.check(parts.module, seq, cfg.micro_batch_size, parts.model_args.vocab_size,
                         cfg.precision, layout.on_cpu)
        datasets = data.build_datasets(job.data, source, tokenizer, split)
        if layout.rank0:
            lines = console.summary(job, layout, parts, source)
            if cfg.pipeline_parallel > 1:
                lines.append(f"pipeline partition ({cfg.pipeline_parallel} stages):\n"
                             + pipeline_plan.describe(parts.module.plan))
            quiet_line = quiet.report(cfg.save) if quiet is not None else None
            print("\n".join(lines + ([quiet_line] if quiet_line else [])), flush=True)
        logger = Logger(parts.module.config, seq, parts.model_args.vocab_size, gbs, layout.world_size,
                        device_peak_tflops(cfg.peak_tflops), cfg.log_json, cfg.tensorboard_dir,
                        layout.rank0)
        trainer = Trainer(job, layout, parts, tokenizer, datasets, logger)
        if held.resume_from is not None:
            agreed(trainer.resume)  # its checks come before its collectives
        if cfg.save:
            checkpointing.start_save_helper()  # before ExitSignal: SIGTERM ignored in the helper
        signals = ExitSignal()
        try:
            return trainer.run(signals)
        finally:
            logger.close()
            late = quiet.report(cfg.save) if quiet is not None and layout.rank0 else None
            if late:  # warnings after the first step's line (e.g. at the first save)
                print(late, flush=True)
    except BaseException:
        failed = True
        raise
    finally:
        if held.lock is not None:
            held.lock.release()
        if not failed:  # a failed rank may have queued collectives its peers never join
            parallel.destroy()
