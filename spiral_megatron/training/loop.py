"""The training run: start the process, check everything, build, (resume,) train, evaluate, save.

Failure handling, as Megatron-LM's: a non-finite loss or gradient norm stops the run naming
the iteration (nothing is saved, so the last good checkpoint stays the latest); SIGTERM or
SIGINT saves a checkpoint at the end of the current step and exits cleanly.
"""

import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spiral_megatron import parallel, pipeline_plan
from spiral_megatron.training import checkpointing, config, data, memory, step
from spiral_megatron.training.build import Components, build
from spiral_megatron.training.config import ConfigError, TrainingConfig
from spiral_megatron.training.metrics import Logger, device_peak_tflops, tensorboard_writer


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm became NaN or inf."""


class ExitSignal:
    """Records SIGTERM/SIGINT; every rank learns of it at the same step (all-reduce)."""

    def __init__(self):
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([int(self.received)], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class Layout:
    """This process's place in the run."""

    rank0: bool
    world_size: int
    dp_size: int
    dp_rank: int
    on_cpu: bool


def start(cfg: TrainingConfig) -> Layout:
    """torch.distributed and Megatron's groups; then every check that needs the world size."""
    from megatron.core import parallel_state

    on_cpu = not torch.cuda.is_available()
    backend = None if cfg.backend == "auto" else cfg.backend
    if on_cpu and backend == "nccl":
        raise ConfigError("backend 'nccl' needs CUDA GPUs; this machine has none (use gloo or auto)")
    if on_cpu and cfg.precision != "fp32":
        raise ConfigError(f"precision {cfg.precision!r} is not supported on CPU; use fp32")
    config.check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before Megatron asserts on it
    parallel.initialize(cfg.tensor_parallel, cfg.pipeline_parallel, seed=cfg.seed, backend=backend)
    dp = config.check_world(cfg, dist.get_world_size())
    return Layout(dist.get_rank() == 0, dist.get_world_size(), dp,
                  parallel_state.get_data_parallel_rank(), on_cpu)


def preflight(cfg: TrainingConfig, layout: Layout) -> None:
    """Refuse, before any compute, what would fail later: fp8 without TE, bad folders."""
    if cfg.fp8 is not None:
        from spiral_megatron.layer_specs import have_transformer_engine

        if layout.on_cpu or not have_transformer_engine():
            raise ConfigError(f"fp8 {cfg.fp8!r} needs CUDA GPUs and Transformer Engine")
    if cfg.save:
        checkpointing.check_writable(cfg.save)
    if cfg.load and checkpointing.latest_iteration(cfg.load) is None:
        raise ConfigError(f"load {cfg.load!r}: no {checkpointing.TRACKER} there (no complete checkpoint)")
    if layout.rank0 and cfg.tensorboard_dir:
        tensorboard_writer(cfg.tensorboard_dir).close()


def prepare_data(cfg: TrainingConfig, layout: Layout):
    """(source, tokenizer); rank 0 builds the embedded corpus first when it is the data."""
    if layout.rank0:
        source = data.resolve(cfg, build_default=True)
    dist.barrier()
    if not layout.rank0:
        source = data.resolve(cfg, build_default=False)
    return source, data.load_tokenizer(source, cfg.tokenizer_vocab_size)


class Trainer:
    """Holds the run's state between steps: iteration, consumed samples, data iterators."""

    def __init__(self, cfg: TrainingConfig, layout: Layout, parts: Components, tokenizer,
                 datasets, logger: Logger):
        self.cfg, self.layout, self.parts, self.tokenizer, self.logger = cfg, layout, parts, tokenizer, logger
        self.train_ds, self.valid_ds = datasets
        self.seq_length = config.seq_length(cfg)
        self.num_microbatches = cfg.global_batch_size // (cfg.micro_batch_size * layout.dp_size)
        self.iteration, self.consumed_samples, self.last_saved = 0, 0, None

    def batches(self, dataset, start: int):
        return data.micro_batches(dataset, start, self.cfg.micro_batch_size, self.layout.dp_rank,
                                  self.layout.dp_size)

    def resume(self) -> None:
        restored = checkpointing.load(self.cfg.load, self.parts)
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
        if self.layout.rank0:
            print(f"resumed from {self.cfg.load} at iteration {self.iteration} "
                  f"({self.consumed_samples} samples consumed)", flush=True)

    def save(self) -> None:
        if not self.cfg.save or self.last_saved == self.iteration:
            return
        folder = checkpointing.save(self.cfg.save, self.iteration, self.consumed_samples,
                                    self.parts, self.cfg, self.tokenizer)
        self.last_saved = self.iteration
        if self.layout.rank0:
            print(f"saved checkpoint {folder}", flush=True)

    def evaluate(self) -> float:
        return step.evaluate(self.parts, self.batches(self.valid_ds, 0), self.cfg.eval_iters,
                             self.num_microbatches, self.seq_length, self.cfg.micro_batch_size)

    def train_one(self, batches) -> dict:
        stats = step.train_step(self.parts, batches, self.num_microbatches, self.seq_length,
                                self.cfg.micro_batch_size, self.cfg.global_batch_size)
        self.iteration += 1
        self.consumed_samples += self.cfg.global_batch_size
        bad = [k for k in ("loss", "grad_norm") if stats[k] is not None and not math.isfinite(stats[k])]
        if bad:
            latest = checkpointing.latest_iteration(self.cfg.save) if self.cfg.save else None
            raise NonFiniteLoss(
                f"{' and '.join(f'{k} {stats[k]}' for k in bad)} at iteration {self.iteration}: "
                f"stopping; last good checkpoint: "
                + (f"iteration {latest} in {self.cfg.save}" if latest is not None else "none"))
        return stats

    def run(self, signals: ExitSignal) -> str:
        """Train to exit_interval or train_iters; returns why it stopped."""
        cfg, stop = self.cfg, self.cfg.exit_interval or self.cfg.train_iters
        batches, val_loss = self.batches(self.train_ds, self.consumed_samples), None
        while self.iteration < stop:
            started = time.time()
            stats = self.train_one(batches)
            self.logger.step_done(self.iteration, stop, time.time() - started)
            last = self.iteration == stop
            evaluate = cfg.eval_interval and (self.iteration % cfg.eval_interval == 0 or last)
            val_loss = self.evaluate() if evaluate else None
            if self.iteration % cfg.log_interval == 0 or last:
                self.logger.log(self.iteration, self.consumed_samples, stats, val_loss)
            elif val_loss is not None:
                self.logger.log_eval(self.iteration, val_loss)
            if cfg.save_interval and self.iteration % cfg.save_interval == 0:
                self.save()
            if signals.any_rank():
                self.save()
                return f"exit signal received: stopped after iteration {self.iteration}"
        self.save()
        return f"finished iteration {self.iteration}"


def run(cfg: TrainingConfig) -> str:
    """The whole job; raises ConfigError & co. before compute, NonFiniteLoss during it."""
    layout = start(cfg)
    try:
        preflight(cfg, layout)
        if layout.rank0:
            print("resolved config:\n" + cfg.to_yaml(), flush=True)
        source, tokenizer = prepare_data(cfg, layout)
        seq, gbs = config.seq_length(cfg), cfg.global_batch_size
        split = data.check(cfg, source, tokenizer, seq)
        parts = build(cfg, tokenizer.vocab_size, layout.on_cpu)
        if cfg.check_memory:
            memory.check(parts.module, seq, cfg.micro_batch_size, parts.model_args.vocab_size,
                         cfg.precision, layout.on_cpu)
        if layout.rank0:
            print(f"pipeline partition ({cfg.pipeline_parallel} stage"
                  f"{'s' if cfg.pipeline_parallel > 1 else ''}):\n"
                  + pipeline_plan.describe(parts.module.plan), flush=True)
        datasets = data.build_datasets(cfg, source, tokenizer, seq, split,
                                       (cfg.train_iters * gbs, max(cfg.eval_iters * gbs, 1)))
        logger = Logger(parts.module.config, seq, parts.model_args.vocab_size, gbs, layout.world_size,
                        device_peak_tflops(cfg.peak_tflops), cfg.log_json, cfg.tensorboard_dir,
                        layout.rank0)
        trainer = Trainer(cfg, layout, parts, tokenizer, datasets, logger)
        if cfg.load:
            trainer.resume()
        signals = ExitSignal()
        try:
            return trainer.run(signals)
        finally:
            logger.close()
    finally:
        parallel.destroy()
