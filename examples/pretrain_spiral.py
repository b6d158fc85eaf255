"""Pretrain a SpiralFormer with Megatron-Core: `torchrun --nproc_per_node=N examples/pretrain_spiral.py`.

With no arguments it trains the `debug` flavor on the embedded corpus (configs/debug-cpu.yaml).
Any config key can be overridden: `--config configs/spiral-160m.yaml --train-iters 1000
--model.chunk_sizes 16,8,4,2,1`. See spiral_megatron/job/settings/config.py for every key.
"""

import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "debug-cpu.yaml"


def parse(argv):
    """The resolved TrainingConfig of the command line (checked before anything starts)."""
    from spiral_megatron.job.settings import config

    return config.load(argv, DEFAULT_CONFIG)


def train(cfg, quiet=None) -> str:
    from spiral_megatron.quantization.checkpoint import TRAINING_HOOK
    from spiral_megatron.job.checkpoint import extra_state
    from spiral_megatron.job.run import loop

    extra_state.register(TRAINING_HOOK)  # a quantized checkpoint keeps its quantizers (QAT)
    return loop.run(cfg, quiet)


def main(argv) -> int:
    """Exit codes: 0 done (or stopped by SIGTERM/SIGINT after saving), 2 a check refused the job
    (one line naming the fix), 1 a non-finite loss or a failed save (one line). Any other
    exception propagates: `fatal.run` prints its traceback once, also into torchrun's error
    file, and ends the process at once (so that the whole job ends)."""
    from spiral_megatron.job.run.console import HeldWarnings

    with HeldWarnings() as quiet:  # from before Megatron's imports warn (issue 17)
        return _main(argv, quiet)


def _main(argv, quiet) -> int:
    from spiral_megatron.job.checkpoint.checkpointing import SaveFailed
    from spiral_megatron.job.settings.config import ConfigError, TrainingConfig
    from spiral_megatron.job.run.loop import NonFiniteLoss

    if "--help" in argv or "-h" in argv:
        from spiral_megatron.job.settings.cli import help_text

        print(help_text(TrainingConfig))
        return 0
    from spiral_megatron.job.run.errors import report

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        cfg = parse(argv)
    except ConfigError as e:  # every rank parses the same command line: rank 0 says it
        if rank0:
            report(f"pretrain_spiral: error: {e}")
        return 2
    try:
        outcome = train(cfg, quiet)
    except (SaveFailed, NonFiniteLoss) as e:
        if not getattr(e, "reported_elsewhere", False):
            report(f"pretrain_spiral: {'error: ' if isinstance(e, SaveFailed) else ''}{e}")
        return 1
    except ConfigError as e:  # the project's own checks: bad config, data, checkpoint or folder
        if not getattr(e, "reported_elsewhere", False):
            report(f"pretrain_spiral: error: {e}")
        return 2
    if rank0:
        print(f"pretrain_spiral: {outcome}", flush=True)
    return 0


if __name__ == "__main__":  # dist_checkpointing's save helper re-imports this module
    from spiral_megatron.job.run import fatal

    fatal.run(main, sys.argv[1:])
