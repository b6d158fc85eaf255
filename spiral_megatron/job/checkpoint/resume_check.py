"""Before loading a checkpoint: is it the same model, data shape and LR schedule as this run?

Loading weights into another architecture, another sequence length or another tokenizer of
the same size would either fail deep inside Megatron or, worse, succeed silently. The saved
resolved config, model_args.json and tokenizer are compared with this run's first, and every
difference is named. The LR schedule follows Megatron-LM: `override_opt_param_scheduler`
takes this run's values, `use_checkpoint_opt_param_scheduler` the checkpoint's, and without
either a difference is refused.
"""

from pathlib import Path
from typing import Dict, List, Optional

from spiral_megatron.model.model_args import ModelArgs
from spiral_megatron.job.settings.keys import ConfigError, TrainingConfig
from spiral_megatron.job.data.tokenizer import Tokenizer

# Keys that may change between runs of one training without saying so: where it runs, how
# it logs, when it saves and stops.
RUN_KEYS = {"save", "load", "log_json", "tensorboard_dir", "log_interval", "eval_interval", "eval_iters",
            "save_interval", "exit_interval", "exit_duration_in_mins", "cache_dir", "backend", "peak_tflops",
            "tensor_parallel", "pipeline_parallel", "sequence_parallel", "use_distributed_optimizer", "async_save",
            "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler", "model",
            "check_for_spiky_loss", "spiky_loss_factor", "finetune", "no_load_optim", "no_load_rng",
            "dist_ckpt_optim_fully_reshardable", "ddp_bucket_size", "num_workers", "print_config",
            "use_checkpoint_args", "distributed_timeout_minutes", "manual_gc", "manual_gc_interval", "manual_gc_eval",
            "empty_unused_memory_level", "exit_on_missing_checkpoint", "log_params_norm", "log_num_zeros_in_grad",
            "mmap_bin_files", "use_tokenizer_model_from_checkpoint_args"}

# Megatron's OptimizerParamScheduler state -> the keys of this config that set it.
SCHEDULE_FIELDS = {"max_lr": "lr", "min_lr": "min_lr", "lr_warmup_steps": "lr_warmup_iters (or _samples, _fraction)",
                   "lr_decay_steps": "lr_decay_iters/train_iters (or _samples)", "lr_decay_style": "lr_decay_style",
                   "start_wd": "weight_decay", "end_wd": "weight_decay", "wd_incr_steps": "train_iters (or _samples)",
                   "wd_incr_style": "weight decay style", "wsd_decay_steps": "lr_wsd_decay_iters (or _samples)",
                   "lr_wsd_decay_style": "lr_wsd_decay_style"}


def _note(field: str, saved, new) -> str:
    """What to set where a recorded field is not a key: GeLU and its tanh approximation differ
    only by Megatron's fused bias-GeLU (bias_activation_fusion)."""
    if field == "activation_func_name" and {saved, new} == {"gelu", "gelu_tanh"}:
        return (" (Megatron's fused bias-GeLU is the tanh approximation 'gelu_tanh': set "
                "model.bias_activation_fusion to match the checkpoint)")
    return ""


class ResumeMismatch(ConfigError):
    """The checkpoint was trained with another model, data shape or LR schedule."""


def architecture_differences(saved: ModelArgs, new: ModelArgs, weights_only: bool) -> List[str]:
    """`field saved -> new` for every difference in the model's function (each recorded FUNCTION
    field, spiral_megatron/config/fields.py), vocabulary and sequence length (which may change when
    only weights are loaded)."""
    diffs = [f"model.{k} {saved.config.get(k)!r} -> {new.config.get(k)!r}{_note(k, saved.config.get(k), new.config.get(k))}"
             for k in sorted(set(saved.config) | set(new.config)) if saved.config.get(k) != new.config.get(k)]
    if saved.vocab_size != new.vocab_size:
        diffs.append(f"padded vocab_size {saved.vocab_size} -> {new.vocab_size}")
    if not weights_only and saved.max_sequence_length != new.max_sequence_length:
        diffs.append(f"seq_length {saved.max_sequence_length} -> {new.max_sequence_length}")
    for name in ("share_embeddings_and_output_weights", "position_embedding_type", "rotary_base",
                 "rotary_percent"):
        if getattr(saved, name) != getattr(new, name):
            diffs.append(f"{name} {getattr(saved, name)!r} -> {getattr(new, name)!r}")
    return diffs


def tokenizer_difference(saved_folder: Path, tokenizer) -> Optional[str]:
    """A line when the checkpoint's tokenizer is not this run's (same vocabulary size or not)."""
    if not (saved_folder / "tokenizer.json").is_file() or not hasattr(tokenizer, "unique_identifiers"):
        return None
    saved = Tokenizer.load(saved_folder).unique_identifiers
    new = tokenizer.unique_identifiers
    if saved["sha256"] == new["sha256"]:
        return None
    return (f"tokenizer: the checkpoint's ({saved['vocab_size']} tokens, sha256 {saved['sha256']}) is not "
            f"this run's ({new['vocab_size']} tokens, sha256 {new['sha256']})")


def check_model(folder: Path, saved_args: ModelArgs, new_args: ModelArgs, tokenizer, weights_only: bool) -> None:
    """Refuse a checkpoint of another architecture, sequence length or tokenizer."""
    diffs = architecture_differences(saved_args, new_args, weights_only)
    tok = tokenizer_difference(folder / "tokenizer", tokenizer)
    if tok:
        diffs.append(tok)
    if diffs:
        take = " or pass --use-checkpoint-args to take the checkpoint's model" if len(diffs) > bool(tok) else ""
        raise ResumeMismatch(f"load {str(folder)!r}: the checkpoint differs from this run in "
                             f"{'; '.join(diffs)} (change these back{take}; a new model needs a new --save "
                             f"folder)")


def schedule_differences(saved: Dict, scheduler) -> List[str]:
    return [f"{name} {saved[name]!r} -> {getattr(scheduler, name)!r} ({key})"
            for name, key in SCHEDULE_FIELDS.items()
            if name in saved and saved[name] != getattr(scheduler, name)]


def check_schedule(folder: Path, saved: Dict, scheduler, cfg: TrainingConfig) -> Optional[str]:
    """Megatron-LM's rule for a changed LR schedule; returns a line to print, or refuses."""
    diffs = schedule_differences(saved, scheduler)
    if not diffs:
        return None
    if cfg.override_opt_param_scheduler:
        return f"LR schedule: this run's values replace the checkpoint's: {'; '.join(diffs)}"
    if cfg.use_checkpoint_opt_param_scheduler:
        return f"LR schedule: the checkpoint's values are kept, not this run's: {'; '.join(diffs)}"
    raise ResumeMismatch(
        f"load {str(folder)!r}: the LR schedule differs from the checkpoint's (in samples, as Megatron "
        f"counts): {'; '.join(diffs)}; pass --override-opt-param-scheduler to use this run's values or "
        f"--use-checkpoint-opt-param-scheduler to keep the checkpoint's")


def other_differences(saved: Optional[Dict], cfg: TrainingConfig) -> Optional[str]:
    """A line naming the other keys that changed since the checkpoint. Most take this run's
    value; what the optimizer state holds (Adam's betas and eps, in its param groups) is
    restored from the checkpoint, as in Megatron-LM."""
    if not saved:
        return None
    new = cfg.to_dict()
    diffs = [f"{k} {saved[k]!r} -> {new[k]!r}" for k in new
             if k in saved and k not in RUN_KEYS and k not in CHECKED_KEYS and saved[k] != new[k]]
    if not diffs:
        return None
    adam = any(d.startswith("adam_") for d in diffs)
    return (f"resume: keys that differ from the checkpoint's config: {'; '.join(diffs)}"
            + (" (Adam's betas and eps are restored from the checkpoint's optimizer state)" if adam else ""))


# Compared above (architecture, tokenizer, schedule), or may change freely (data seed).
CHECKED_KEYS = {"lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style", "train_iters",
                "train_samples", "lr_warmup_samples", "lr_decay_samples", "weight_decay", "seq_length", "tokenizer",
                "tokenizer_vocab_size", "lr_wsd_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_samples"}
