"""Pretrain a SpiralFormer with Megatron-Core: `torchrun --nproc_per_node=N examples/pretrain_spiral.py`.

With no arguments it trains the `debug` flavor on the embedded corpus (configs/debug-cpu.yaml).
Any config key can be overridden: `--config configs/spiral-160m.yaml --train-iters 1000
--model.chunk_sizes 16,8,4,2,1`. `--help` lists every key (spiral_megatron/job/settings/keys.py).
"""

import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "debug-cpu.yaml"


def parse(argv):
    """The job of the command line, resolved and checked before anything starts (the model
    taken from --load's checkpoint with --use-checkpoint-args)."""
    from spiral_megatron.job.checkpoint.checkpoint_args import resolve

    return resolve(argv, DEFAULT_CONFIG)


def train(job, quiet=None) -> str:
    from spiral_megatron.quantization.checkpoint import TRAINING_HOOK
    from spiral_megatron.job.checkpoint import extra_state
    from spiral_megatron.job.run import loop

    extra_state.register(TRAINING_HOOK)  # a quantized checkpoint keeps its quantizers (QAT)
    return loop.run(job, quiet)


def main(argv) -> int:
    """Exit codes: 0 done (or stopped by SIGTERM/SIGINT after saving), 2 a check refused the job
    (one line naming the fix), 1 a non-finite loss or a failed save (one line). Only the
    project's own errors (spiral_megatron.errors.SpiralError) are one line; any other exception
    propagates: `fatal.run` prints its traceback once, also into torchrun's error
    file, and ends the process at once (so that the whole job ends)."""
    from spiral_megatron import parallel
    from spiral_megatron.job.run.console import HeldWarnings

    parallel.default_cuda_connections()  # before anything starts CUDA
    with HeldWarnings() as quiet:  # from before Megatron's imports warn (issue 17)
        return _main(argv, quiet)


def _main(argv, quiet) -> int:
    from spiral_megatron.errors import ConfigError, SpiralError
    from spiral_megatron.job.checkpoint.checkpointing import SaveFailed
    from spiral_megatron.job.run.trainer import NonFiniteLoss
    from spiral_megatron.job.settings.keys import TrainingConfig

    if "--help" in argv or "-h" in argv:
        from spiral_megatron.job.settings.cli import help_text

        print(help_text(TrainingConfig))
        return 0
    from spiral_megatron.job.run import fatal
    from spiral_megatron.job.run.errors import report

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        job = parse(argv)
    except ConfigError as e:  # every rank parses the same command line: rank 0 prints it
        report(f"pretrain_spiral: error: {e}", echo=rank0)  # every rank records it for torchrun
        if not rank0:
            fatal.let_the_reporter_exit_first()
        return 2
    try:
        outcome = train(job, quiet)
    except SpiralError as e:  # the project's own: a refusal (config, data, checkpoint, folder), a failed save, a stop
        # Printed once: by the rank that found it (reported_elsewhere: another did), rank 0 when
        # each raised the same (every_rank); the others leave after it, so that torchrun names
        # it. Every rank records it for torchrun all the same.
        mine = not getattr(e, "reported_elsewhere", False) and (rank0 or not getattr(e, "every_rank", False))
        report(f"pretrain_spiral: {'error: ' if isinstance(e, ConfigError) else ''}{e}", echo=mine)
        if not mine:
            fatal.let_the_reporter_exit_first()
        return 1 if isinstance(e, (SaveFailed, NonFiniteLoss)) else 2
    if rank0:
        print(f"pretrain_spiral: {outcome}", flush=True)
    return 0


if __name__ == "__mp_main__":  # a spawned helper (the manager of Megatron's checkpoint writer) ends with its rank
    from spiral_megatron.job.run.parent_watch import exit_with_parent

    exit_with_parent()


if __name__ == "__main__":  # dist_checkpointing's save helper re-imports this module
    from spiral_megatron.job.run import fatal

    fatal.run(main, sys.argv[1:])
