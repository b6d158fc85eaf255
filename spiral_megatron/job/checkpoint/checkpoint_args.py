"""Megatron-LM's --use-checkpoint-args: the model of the --load checkpoint, not the flags'.

Fine-tuning a converted model (tools/convert_from_hf.py) or another run's checkpoint needs its
architecture. With `use_checkpoint_args` the model the checkpoint recorded (model_args.json:
every field of its function, the activation, its rotary settings) replaces the flavor's and
the config file's, as Megatron-LM's `load_args_from_checkpoint` forces them; its sequence
length applies unless the command line gives one (Megatron-LM's rule for --seq-length), its
embedding rows (padded vocabulary) through make_vocab_size_divisible_by, which another TP
size would otherwise pad differently, and its tokenizer unless one is given (Megatron-LM's
use_tokenizer_model_from_checkpoint_args; the data's own record is checked against it). A
command-line value that contradicts the checkpoint is refused, where Megatron-LM drops it.
The job then resolves these keys as any others (job/settings/resolve.py), and the resume
check compares the result with the checkpoint as usual.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any, Collection, Dict, Optional, Sequence

from spiral_megatron.job.checkpoint.checkpoint_files import CheckpointError, find_resumable, iteration_dir
from spiral_megatron.job.settings import config, model_fields
from spiral_megatron.job.settings.keys import ConfigError, TrainingConfig
from spiral_megatron.job.settings.resolve import Resolved, resolve_keys
from spiral_megatron.model.model_args import ACTIVATIONS, ModelArgs


def resolve(argv: Sequence[str], default_config=None) -> Resolved:
    """The job of command line `argv` (job/settings/resolve.py's `resolve`), with the model
    taken from the --load checkpoint when it says --use-checkpoint-args."""
    return resolve_keys(apply(config.read(argv, default_config), config.given(config.parse_cli(argv))))


def apply(keys: TrainingConfig, given: Collection[str]) -> TrainingConfig:
    """`keys` with the model of the --load checkpoint when `keys.use_checkpoint_args`.
    `given`: the keys the command line set (config.given), which must agree with it."""
    if not keys.use_checkpoint_args:
        return keys
    if keys.load is None:
        raise ConfigError("use_checkpoint_args needs --load: the checkpoint whose model to take")
    root = Path(keys.load)
    if not root.is_dir() or not any(root.iterdir()):
        raise ConfigError(f"use_checkpoint_args: load {keys.load!r} holds no checkpoint to take the model from "
                          f"(the folder is {'empty' if root.is_dir() else 'missing'})")
    try:
        folder = iteration_dir(root, find_resumable(root, None))
    except CheckpointError as e:
        raise ConfigError(f"use_checkpoint_args: {e}") from None
    if not (folder / "model_args.json").is_file():
        raise ConfigError(f"use_checkpoint_args: {str(folder)!r} holds no model_args.json to take the model from")
    args = ModelArgs.load(folder / "model_args.json")
    recorded = model_keys(args)
    recorded_keys = {"rotary_base": args.rotary_base, "rotary_percent": args.rotary_percent}
    if "seq_length" not in given:
        recorded_keys["seq_length"] = args.max_sequence_length
    tokenizer = folder / "tokenizer"
    if (keys.tokenizer is None and not keys.mock_data and keys.use_tokenizer_model_from_checkpoint_args
            and (tokenizer / "tokenizer.json").is_file()):
        recorded_keys["tokenizer"] = str(tokenizer)  # Megatron-LM takes the checkpoint's tokenizer model too
    if "make_vocab_size_divisible_by" not in given and args.vocab_size % keys.tensor_parallel == 0:
        # the checkpoint's embedding rows at this TP (Megatron-LM takes its padded_vocab_size)
        recorded_keys["make_vocab_size_divisible_by"] = args.vocab_size // keys.tensor_parallel
    clashes = [f"--{k.replace('_', '-')} {getattr(keys, k)!r} (the checkpoint's: {v!r})"
               for k, v in recorded_keys.items() if k in given and not _same(getattr(keys, k), v)]
    clashes += [f"--model.{k} {keys.model[k]!r} (the checkpoint's: {v!r})" for k, v in recorded.items()
                if f"model.{k}" in given and not _same(keys.model[k], v)]
    if clashes:
        raise ConfigError(f"use_checkpoint_args takes the model from {str(folder)!r}, which contradicts "
                          f"{'; '.join(clashes)}: leave them out")
    if os.environ.get("RANK", "0") == "0":  # every rank reads the keys
        seq = "" if "seq_length" in given else f", seq_length {args.max_sequence_length}"
        tok = f", its tokenizer {recorded_keys['tokenizer']}" if "tokenizer" in recorded_keys else ""
        print(f"model: the architecture of {folder} (use_checkpoint_args: its model_args.json{seq}{tok})", flush=True)
    model = {**keys.model, **recorded}
    return dataclasses.replace(keys, model=model_fields.typed(model), **recorded_keys)


def model_keys(args: ModelArgs) -> Dict[str, Any]:
    """The recorded function as `model.<field>` keys: activation_func_name as the
    activation's name and, where it decides the GeLU, bias_activation_fusion."""
    recorded = dict(args.config)
    name = recorded.pop("activation_func_name", "gelu")
    fn, fused = ACTIVATIONS[name]
    recorded["activation_func"] = next(key for key, f in model_fields.ACTIVATIONS.items() if f is fn)
    if fused is not None:
        recorded["bias_activation_fusion"] = fused
    return recorded


def _same(a: Any, b: Any) -> bool:
    """Equal as settings: a list, a tuple and "8,4,2,1" of the same numbers are one value."""
    return _plain(a) == _plain(b)


def _plain(value: Any) -> Optional[Any]:
    if isinstance(value, str) and "," in value:
        try:
            return tuple(int(x) for x in value.split(","))
        except ValueError:
            return value
    return tuple(value) if isinstance(value, (list, tuple)) else value
