"""The run's state between steps (iteration, consumed samples, data position, checks, saves)
and the loop over steps.

Failure handling, as Megatron-LM's: a non-finite loss or gradient norm (and, when asked, a
spiky loss or gradient norm: divergence.py) stops the run naming the iteration, before that
step is saved; the message says what the latest checkpoint holds (its step's loss, gradient
norm, largest weight) and whether its weights are the ones that just failed. Weights that are
not finite are never saved. SIGTERM or SIGINT saves a checkpoint at the end of the current
step and exits cleanly.
"""

import math
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from spiral_megatron.errors import SaveFailed, SpiralError
from spiral_megatron.job.build import Components, sync_params
from spiral_megatron.job.checkpoint import checkpointing, loading
from spiral_megatron.job.data import datasets as data
from spiral_megatron.job.run import divergence, step
from spiral_megatron.job.run.housekeeping import ManualGC
from spiral_megatron.job.run.metrics import Logger
from spiral_megatron.job.checkpoint.checkpoint_files import same_folder
from spiral_megatron.job.run.startup import Layout, resumes_save
from spiral_megatron.job.run.stopping import ExitSignal, end_iteration, resume_hint
from spiral_megatron.job.settings.resolve import Resolved
from spiral_megatron.parallel.params_norm import params_norm


class NonFiniteLoss(SpiralError, RuntimeError):
    """The loss, the gradient norm or the weights became NaN or inf (or spiked, when checked)."""


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
        self.loaded_from = None  # the folder resumed from (--load, or --save for a resumed fine-tuning run)
        self.last_stats, self.saved_stats = {}, {}  # iteration -> what its checkpoint was saved after
        self.background = checkpointing.BackgroundSaves(layout.rank0) if cfg.async_save and cfg.save else None
        self.spiky_loss = divergence.LargeValueCheck() if cfg.check_for_spiky_loss else None
        self.large_grads = divergence.LargeValueCheck() if cfg.check_for_large_grads else None
        self.flags = step.StepFlags(layout.dp_size)  # each step's loss and exit flag, read a step late
        self.settled, self.exit_requested = None, False
        self.skipped = 0  # steps the optimizer skipped since the last log line (fp16 overflows)
        self.gc = ManualGC(cfg.manual_gc, cfg.manual_gc_interval, cfg.manual_gc_eval)  # --manual-gc

    def batches(self, dataset, start: int):
        return data.micro_batches(dataset, start, self.cfg.micro_batch_size, self.layout.dp_rank,
                                  self.layout.dp_size, self.cfg.num_workers)

    def resume(self, root: str, finetune: bool = False) -> None:
        restored = loading.load(root, self.parts, self.cfg, self.tokenizer, finetune)
        self.loaded_from = root
        self.iteration = restored.iteration
        if finetune:
            self.iteration = self.consumed_samples = 0
            if self.layout.rank0:
                print(f"finetune: loaded the model weights of {root} (iteration {restored.iteration}); this run "
                      f"starts at iteration 0 with a fresh optimizer, LR schedule and data position", flush=True)
            return
        if restored.weights_only:
            # No data position saved: assume Megatron's sampler order up to this iteration.
            self.consumed_samples = restored.iteration * self.cfg.global_batch_size
            if self.layout.rank0:
                print(f"loaded model weights only from {root} (iteration {self.iteration}): "
                      f"it holds no optimizer, LR scheduler or data position; the optimizer and the "
                      f"LR schedule start fresh, data from sample {self.consumed_samples}", flush=True)
            return
        self.consumed_samples = restored.consumed_samples
        self.saved_stats[self.iteration] = restored.extra or {}
        if self.cfg.save and same_folder(self.cfg.save, root):
            self.last_saved = self.iteration  # it is there already: never rewrite it
        if self.layout.rank0:
            print(f"resumed from {root} at iteration {self.iteration} "
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

    def nothing_to_train(self) -> str:
        """Why a run resumed at or past train_iters ends without a step: a requeue of a finished
        job, or a --train-iters that does not reach past the loaded checkpoint's iteration (it
        counts from 0, as Megatron-LM's)."""
        line = (f"finished iteration {self.iteration}: no step to run, {self.loaded_from!r} holds iteration "
                f"{self.iteration}")
        if self.iteration == self.cfg.train_iters:
            return line + ", the --train-iters this run stops at"
        return line + (f", past --train-iters {self.cfg.train_iters} (it counts from iteration 0: pass more than "
                       f"{self.iteration} to train on)")

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
        self.gc.evaluation()
        loss = step.evaluate(self.parts, self.batches(self.valid_ds, 0), self.cfg.eval_iters, self.num_microbatches,
                             self.seq_length, self.cfg.micro_batch_size, self.cfg.empty_unused_memory_level)
        self.gc.evaluation()
        return loss

    def params_norm(self) -> Optional[float]:
        """--log-params-norm: the weights' global norm after this step (their deferred all-gather
        finished first), else None."""
        if not self.cfg.log_params_norm:
            return None
        sync_params(self.parts.model)
        return params_norm(self.parts.module)

    def train_one(self, batches, signals: ExitSignal) -> None:
        """Queue one step; check the previous one, whose values reached the host meanwhile."""
        loss, host_values = step.train_step(self.parts, batches, self.num_microbatches, self.seq_length,
                                            self.cfg.micro_batch_size, self.cfg.global_batch_size,
                                            self.cfg.empty_unused_memory_level)
        self.iteration += 1
        self.consumed_samples += self.cfg.global_batch_size
        # a failed log write (rank 0's) stops the run as a signal does: every rank, saved, one step later
        self.check(self.flags.swap(self.iteration, loss, signals.received or self.logger.failure is not None,
                                   host_values))

    def stop_if_log_failed(self, outcome: str) -> None:
        """Raise SaveFailed on every rank where rank 0 failed to write a log file (a collective:
        every rank calls it at the same point, once the run has saved); `outcome` says how the
        run ended."""
        said = [self.logger.failure]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(said, src=0)  # the logger writes on rank 0
        if said[0] is not None:
            failed = SaveFailed(f"{said[0]}; {outcome}")
            failed.every_rank = True  # examples/pretrain_spiral.py: rank 0 prints it, every rank records it
            raise failed

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
        """Train to train_iters, or to the next multiple of exit_interval; returns why it stopped."""
        cfg, stop = self.cfg, end_iteration(self.iteration, self.cfg.train_iters, self.cfg.exit_interval)
        resumes = resume_hint(cfg.save, resumes_save(cfg))
        if self.iteration >= stop:  # resumed at or past it: no step runs, nothing new to save
            return self.nothing_to_train()
        batches, val_loss = self.batches(self.train_ds, self.consumed_samples), None
        while self.iteration < stop:
            if self.background is not None:
                self.background.finalize(blocking=False)
            started = time.time()
            self.train_one(batches, signals)
            self.gc.after_step(self.iteration)
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
                                dict(vars(self.settled), skipped_iterations=self.skipped,
                                     params_norm=self.params_norm()), val_loss)
                self.skipped = 0
            elif val_loss is not None:
                self.logger.log_eval(self.iteration, val_loss)
            if save:
                self.save()
            if self.exit_requested:  # seen one step late, by every rank at the same step
                self.settle()
                self.save()
                self.finish_saves()
                self.stop_if_log_failed(f"stopped after iteration {self.iteration} ({resumes})")
                return f"{signals.reason()}: stopped after iteration {self.iteration} ({resumes})"
        self.settle()
        self.save()
        self.finish_saves()
        if self.iteration < cfg.train_iters:
            return (f"exit interval {cfg.exit_interval}: stopped after iteration {self.iteration} of "
                    f"{cfg.train_iters} ({resumes})")
        return f"finished iteration {self.iteration}"
