"""The training run: start the process, check everything, build, (resume,) train, evaluate, save.

startup.py starts the process and checks what can be checked before any compute; trainer.py
holds the run between steps (its failure handling, its saves). One job at a time saves into a
folder (folder_lock.py).
"""

import time
from typing import Optional

from spiral_megatron import parallel
from spiral_megatron.job.build import build
from spiral_megatron.job.checkpoint import extra_state, results_queue
from spiral_megatron.job.data import datasets as data
from spiral_megatron.job.run import console, memory
from spiral_megatron.job.run.metrics import Logger, device_peak_tflops
from spiral_megatron.job.run.startup import Preflight, agreed, prepare_data, preflight, start
from spiral_megatron.job.run.stopping import ExitSignal
from spiral_megatron.job.run.trainer import Trainer
from spiral_megatron.job.settings.resolve import Resolved
from spiral_megatron.parallel import pipeline_plan


def run(job: Resolved, quiet: Optional[console.HeldWarnings] = None) -> str:
    """The whole job; raises ConfigError & co. before compute, NonFiniteLoss during it.
    `quiet`: the caller's harmless-warnings holder, reported once the save folder exists."""
    cfg = job.keys
    started = time.monotonic()  # --exit-duration-in-mins counts from here, as Megatron-LM's from pretrain()
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
        parts = build(job, prepare=lambda module: extra_state.restore(module, held.resume_root)
                      if cfg.load else None)
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
            agreed(lambda: trainer.resume(held.resume_root, held.finetune))  # checks before collectives
        if cfg.save:
            results_queue.for_saves(cfg.async_save)  # before ExitSignal: SIGTERM ignored in the helper
        signals = ExitSignal(cfg.exit_duration_in_mins, started)
        try:
            with trainer.gc:  # --manual-gc: automatic collection off while training
                outcome = trainer.run(signals)
            logger.close()  # a failure here is the last write's: the run has saved
            trainer.stop_if_log_failed(outcome)
            return outcome
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
