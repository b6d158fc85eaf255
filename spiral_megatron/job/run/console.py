"""What the job shows before its first step (issue 17): the few lines that matter, the whole
config in a file, and third-party warnings known to be harmless counted in one line.

Megatron-LM prints its ~90 arguments and each rank's import warnings; here the resolved
config goes to the save folder's config.yaml (and to the console with --print-config), and a
warning matching HARMLESS is held back: counted on the console, written in full to the save
folder's warnings.log. Any other warning is shown as usual.
"""

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

# [ours] Messages of Megatron-Core warnings that say nothing about this job: optional fused
# kernels missing (torch fallbacks are used: docs/MEGATRON-ON-CPU.md), an experimental class
# defined at import, and a deprecation of Megatron's own default for a field we never set;
# and torch's notes when megatron-core 0.19 loads a checkpoint: its common state read with
# `load(no_dist=True)` (every rank reads it whole, as intended), `load`'s argument order, and
# the ShardedTensor deprecation (megatron-core's own checkpoint format uses them); and torch's
# note when modelopt serializes a quantizer's extra state at a save (`torch.frombuffer` of the
# bytes of its torch.save, only read); torch 2.13's deprecation of the two collectives
# Megatron's distributed optimizer calls (the calls are Megatron's; they work as before); and
# torch's note when that optimizer's zero_grad reads `.grad` of its fp32 shards, which are views
# (megatron/core/optimizer/distrib_optimizer.py marks the line "throws grad-access warning").
HARMLESS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "MimoModelConfig is experimental",
    "full scope is deprecated",
    "assuming the intent is to load in a single process",
    "The argument order of load has been changed",
    "we are deprecating ShardedTensor",
    "The given buffer is not writable",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)
# [ours] Model Optimizer's notes that hold in a tool's one process (tools/*.py read any layout
# into one process), not in a torchrun job, where they are shown: the TP sync of a padded INT4
# block quantizer (TP 1: nothing to sync), the default parallel state of a restored quantizer's
# module (no TP group to set), and its untested-transformers note (tests/quantization cover the
# versions setup.py pins).
ONE_PROCESS_HARMLESS = (
    "amax will not be synced correctly",
    "no parallel_state is set for",
    "is not tested with current version of modelopt",
)
# Megatron-Core log records as harmless: logger name -> message. [ours] The "mcore" save
# strategy is the one checkpointing.py chooses (its BackgroundSaves need it).
HARMLESS_LOGS = {
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    # megatron-core 0.19 reading the common.pt of a 0.16 checkpoint (docs/CHECKPOINTS.md: supported)
    "megatron.core.dist_checkpointing.strategies.common": "load_common is deprecated",
    # megatron-core 0.19's DDP computing the distributed optimizer's parameter layout itself, with
    # the function and arguments its callers would (DistributedOptimizer.compute_full_param_layout;
    # kept for callers such as this job, which also runs on 0.16, where DDP takes no layout)
    "megatron.core.distributed.distributed_data_parallel": "full_param_layout not provided",
}
WARNINGS_LOG = "warnings.log"
CONFIG_FILE = "config.yaml"


class HeldWarnings(logging.Filter):
    """Within `with`: warnings matching `harmless` (HARMLESS), and log records matching
    HARMLESS_LOGS, are kept in `held` instead of shown."""

    def __init__(self, harmless: Tuple[str, ...] = HARMLESS):
        super().__init__()
        self.harmless = harmless
        self.held: List[str] = []
        self._shown = 0  # how many of `held` were counted on the console already

    def __enter__(self) -> "HeldWarnings":
        self._previous = warnings.showwarning
        warnings.showwarning = self._show
        for name in HARMLESS_LOGS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        warnings.showwarning = self._previous
        for name in HARMLESS_LOGS:
            logging.getLogger(name).removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        """logging.Filter: False (held) for a record of HARMLESS_LOGS."""
        if HARMLESS_LOGS.get(record.name, "\0") in record.getMessage():
            self.held.append(f"{record.name}: {record.levelname}: {record.getMessage()}\n")
            return False
        return True

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if any(text in str(message) for text in self.harmless):
            self.held.append(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            self._previous(message, category, filename, lineno, file, line)

    def report(self, save: Optional[str]) -> Optional[str]:
        """The one console line for the warnings held since the last report (None if none), and
        all of them appended to `save`/warnings.log."""
        new = self.held[self._shown:]
        self._shown = len(self.held)
        if not new:
            return None
        where = "not kept: no --save folder"
        if save:
            path = Path(save) / WARNINGS_LOG
            with open(path, "a") as f:
                f.writelines(new)
            where = f"all in {path}"
        return hidden_line(len(new), "Megatron-Core", " per rank", where)


@contextlib.contextmanager
def quiet_tool(name: str):
    """A tool's run (tools/*.py) with the HARMLESS warnings held as the job holds them, and
    counted in one line on stderr at its end. Warnings the user asked for with `python -W` or
    PYTHONWARNINGS are all shown instead, these too."""
    if sys.warnoptions:
        yield
        return
    with HeldWarnings(HARMLESS + ONE_PROCESS_HARMLESS) as held:
        try:
            yield
        finally:
            if held.held:
                print(f"{name}: " + hidden_line(len(held.held), "Megatron-Core/torch", "",
                                                "`python -W default` shows them"), file=sys.stderr)


def hidden_line(n: int, whose: str, per: str, where: str) -> str:
    """The one line that counts `n` held HARMLESS warnings and says `where` they are."""
    return (f"{n} known-harmless {whose} warning{'s' if n > 1 else ''}{per} hidden (optional Apex/Transformer "
            f"Engine kernels missing, experimental or deprecated features; {where})")


def summary(job, layout, parts, source) -> List[str]:
    """The few lines that matter before the first step: model, parameters, layout, data,
    tokens per step, where checkpoints and the config go. `job`: the Resolved settings."""
    from spiral_megatron.config import flops, schedule

    cfg, seq_length, c = job.keys, job.seq_length, parts.module.config
    tied = getattr(parts.module, "share_embeddings_and_output_weights", False)
    params = flops.unique_parameters(c, parts.model_args.vocab_size, tied)
    flavor = job.flavor
    shape = schedule.depth_text(c.num_prelude_layers, c.num_core_layers, c.chunk_sizes, c.num_coda_layers)
    micro = cfg.global_batch_size // (cfg.micro_batch_size * layout.dp_size)
    tokens = cfg.global_batch_size * seq_length
    steps = cfg.train_iters
    stops = (f"; each run stops at the next multiple of {cfg.exit_interval} (--exit-interval)"
             if cfg.exit_interval else "")
    if cfg.train_samples is not None:
        left = cfg.train_samples - steps * cfg.global_batch_size
        stops = (f" (--train-samples {cfg.train_samples}" + (f": the last {left} fill no global batch" if left else "")
                 + ")" + stops)
    vocab = parts.model_args.vocab_size
    padded = f" (padded to {vocab})" if vocab != cfg.tokenizer_vocab_size else ""
    lines = [
        f"model: {flavor or 'custom'} ({shape}, hidden {c.hidden_size}), {params / 1e6:,.2f}M parameters",
        f"layout: {layout.world_size} process{'es' if layout.world_size > 1 else ''} = "
        f"TP {cfg.tensor_parallel} x PP {cfg.pipeline_parallel} x DP {layout.dp_size}, "
        f"{'CPU' if layout.on_cpu else 'GPU'} {cfg.precision}; micro-batch {cfg.micro_batch_size} x "
        f"{micro} per rank, global batch {cfg.global_batch_size}",
        f"data: {_data_line(cfg, source)}, vocabulary {cfg.tokenizer_vocab_size}{padded}, seq {seq_length}",
        f"tokens per step: {tokens:,}; {steps} steps = {tokens * steps:,} tokens{stops}",
    ]
    if cfg.save:
        every = f"every {cfg.save_interval} steps and " if cfg.save_interval else ""
        lines.append(f"checkpoints: {cfg.save} ({every}at the end); config: {Path(cfg.save) / CONFIG_FILE}")
    else:
        lines.append("checkpoints: none (no --save folder)")
    return lines


def _data_line(cfg, source) -> str:
    if source.train is None:
        return "mock data (random tokens)"
    if cfg.data_path:
        return " ".join(cfg.data_path)
    if cfg.train_data_path:  # validated with valid_data_path, whole
        return f"train {' '.join(cfg.train_data_path)}; valid {' '.join(cfg.valid_data_path or ['none'])}"
    return "the embedded corpus (CPython docstrings)"


def write_config(cfg) -> None:
    """The resolved config in the save folder (rank 0), replaced by each run saving there."""
    if cfg.save:
        (Path(cfg.save) / CONFIG_FILE).write_text(cfg.to_yaml())
