"""The job's keys from YAML and `--key value` overrides.

`read` turns YAML + command line into one typed TrainingConfig (job/settings/keys.py), refusing
unknown keys and values of the wrong type with a `ConfigError` naming the key and the value,
and fills in the tokenizer the data names. resolve.py resolves the keys into what the job runs
and checks them (checks.py). ConfigError and TrainingConfig are importable from here too.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

from spiral_megatron.job.data.tokenizer import Tokenizer
from spiral_megatron.job.settings import cli, model_fields
from spiral_megatron.job.settings.keys import (  # noqa: F401 (the names callers read from here)
    FIELDS, TYPES, ConfigError, TrainingConfig, coerce)


def apply(cfg: TrainingConfig, overrides: Dict[str, Any]) -> TrainingConfig:
    """`cfg` with `overrides` applied; `model.<field>` keys go into the model mapping."""
    values, needs, setters = cfg.to_dict(), {}, {}
    for raw_key, raw_value in overrides.items():
        pairs = cli.canonical(raw_key, raw_value, FIELDS)
        if not pairs:
            raise ConfigError(cli.unknown_key_message(raw_key, raw_value, FIELDS))
        for key, value in pairs:
            _check_one_value(setters, key, raw_key, value)
            if key is None:  # a Megatron-LM flag for what the job always does (cli.FIXED)
                if value is not None:
                    needs[raw_key] = value
                continue
            if key.startswith("model."):
                values["model"] = {**values["model"], key[len("model."):]: value}
            elif key == "model" and isinstance(value, str):
                values["model"] = {"flavor": value}
            elif key == "model" and not isinstance(value, dict):
                raise ConfigError(f"model: {value!r} must be a flavor name or a mapping of fields")
            else:
                values[key] = coerce(key, value, TYPES[key])
    for raw_key, (key, why) in needs.items():
        field = key[len("model."):] if key.startswith("model.") else None
        if not (values["model"].get(field) if field else values[key]):
            raise ConfigError(f"--{raw_key} needs --{(field or key).replace('_', '-')} ({why})")
    return TrainingConfig(**values)


def _check_one_value(setters: Dict[str, Any], key: Optional[str], raw_key: str, value: Any) -> None:
    """Refuse two flags that set one key to different values (`--bf16 --fp16`, `--tensor-parallel 2
    --tensor-model-parallel-size 4`), as Megatron-LM asserts for its precisions, rather than
    keep the last. `setters`: key -> (flag, value) so far."""
    if key is None:
        return
    first = setters.setdefault(key, (raw_key, value))
    if first[0] != raw_key and first[1] != value:
        raise ConfigError(f"--{first[0]} and --{raw_key} both set {key} ({first[1]!r}, {value!r}): pass one")


def given(overrides: Dict[str, Any]) -> set:
    """The keys a command line's (or a recipe's) `overrides` set, by their canonical names
    ("seq_length", "model.hidden_size"; a `model` mapping's fields each as "model.<field>")."""
    out = set()
    for raw_key, raw_value in overrides.items():
        for key, value in cli.canonical(raw_key, raw_value, FIELDS):
            if key == "model" and isinstance(value, dict):
                out.update(f"model.{k}" for k in value if k != "flavor")
            elif key is not None:
                out.add(key)
    return out


def parse_cli(argv: Sequence[str]) -> Dict[str, Any]:
    """`--key value`, `--key=value` and bare `--flag` (= true) into an ordered mapping.

    Several values after a key are one value, joined by spaces, as Megatron-LM's list flags take
    them (`--data-path 0.7 a 0.3 b` is `--data-path "0.7 a 0.3 b"`). Values are read as YAML
    scalars (`8`, `true`, `[1, 2]`); types are enforced by `apply`.
    """
    out, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"expected --key, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
                i += 1
            value = " ".join(values) if values else "true"
        try:
            out[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key] = value
        i += 1
    return out


def read(argv: Sequence[str], default_path: Optional[Path] = None) -> TrainingConfig:
    """The keys from `--config PATH` (else `default_path`) plus the other `--key value` pairs,
    typed, with the data's tokenizer and its vocabulary filled in (not yet checked: resolve.py)."""
    overrides = parse_cli(argv)
    path = overrides.pop("config", None) or default_path
    return keys_of(read_yaml(Path(path)) if path is not None else {}, overrides)


def keys_of(data: Dict[str, Any], overrides: Dict[str, Any]) -> TrainingConfig:
    """The keys of a config file's mapping `data` with `overrides` over it (a command line's, or
    a recipe's: spiral_megatron/bridge/recipes.py), typed, the data's tokenizer filled in."""
    cfg = apply(TrainingConfig(), data)
    with_resets = _drop_excluded(data, overrides)
    cfg = apply(cfg, _load_follows_save(data, with_resets))
    resets = set(with_resets) - set(overrides)  # the file's keys the command line excludes
    cfg = sample_based(cfg, given={k.replace("-", "_") for k in overrides} | (set(data) - resets))
    cfg = resolve_tokenizer(cfg, explicit_vocab="tokenizer_vocab_size" in {**overrides, **data})
    if cfg.eval_iters == 0:  # Megatron-LM's way to turn evaluation off
        cfg = dataclasses.replace(cfg, eval_interval=None)
    return dataclasses.replace(cfg, model=model_fields.typed(cfg.model))


def read_yaml(path: Path) -> Dict[str, Any]:
    """The mapping in YAML file `path`; ConfigError naming the file (and line) otherwise."""
    if not path.is_file():
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: {str(path)!r} is not a text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config: {str(path)!r}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


# Keys of which one excludes the other: a command-line value of one drops the YAML's other.
EXCLUSIVE = (("lr_warmup_iters", "lr_warmup_fraction"), ("data_path", "train_data_path"),
             ("train_iters", "train_samples"), ("lr_decay_iters", "lr_decay_samples"),
             ("lr_warmup_iters", "lr_warmup_samples"), ("lr_warmup_samples", "lr_warmup_fraction"))


def _excluded(top: Dict[str, Any]) -> set:
    """The keys that the keys of mapping `top` exclude (EXCLUSIVE), other than its own."""
    given = {k.replace("-", "_") for k in top}
    return ({b for a, b in EXCLUSIVE if a in given} | {a for a, b in EXCLUSIVE if b in given}) - given


def layered(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """Config mapping `top` over `base`, without the keys of `base` that a key of `top`
    excludes (a file's lr_warmup_iters over defaults holding lr_warmup_fraction)."""
    dropped = _excluded(top)
    return {**{k: v for k, v in base.items() if k.replace("-", "_") not in dropped}, **top}


def _drop_excluded(data: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """`overrides`, plus a reset to the default of each YAML key the command line excludes."""
    return {**{k: FIELDS[k].default for k in _excluded(overrides) if k in data}, **overrides}


def _load_follows_save(data: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """`overrides`, plus a config file's `load` moved to the command line's --save where the
    file loads what it saves (a job that resumes itself, as examples/configs/*.yaml): another
    --save then resumes its own folder, not the file's."""
    given = {k.replace("-", "_"): v for k, v in overrides.items()}
    resumes_itself = data.get("load") is not None and data.get("load") == data.get("save")
    if resumes_itself and "save" in given and "load" not in given:
        return {**overrides, "load": given["save"]}
    return overrides


def sample_based(cfg: TrainingConfig, given: set) -> TrainingConfig:
    """Megatron-LM's sample-based training: train_samples sets train_iters, as
    train_samples // global_batch_size; a train_iters also given must be that one (a recorded
    config.yaml holds both)."""
    if cfg.train_samples is None or cfg.global_batch_size < 1:  # checks.py refuses the batch size
        return cfg
    iters = cfg.train_samples // cfg.global_batch_size
    if "train_iters" in given and cfg.train_iters != iters:
        raise ConfigError(f"train_iters {cfg.train_iters} and train_samples {cfg.train_samples} exclude each other (as "
                          f"in Megatron-LM; train_samples takes train_samples // global_batch_size = {iters} steps)")
    if iters < 1:
        raise ConfigError(f"train_samples {cfg.train_samples} must be at least global_batch_size "
                          f"{cfg.global_batch_size} (one step)")
    return dataclasses.replace(cfg, train_iters=iters)


def tokenizers_beside(data: Sequence[str]) -> list:
    """The distinct <prefix>_tokenizer folders (tools/preprocess_data.py's) beside the prefixes of
    a data path or Megatron blend (`a`, or `0.7 a 0.3 b`); a blend Megatron cannot read has none."""
    return sorted({Path(p + "_tokenizer") for p in _prefixes(data)
                   if Path(p + "_tokenizer", "tokenizer.json").is_file()})


def tokenizers_recorded(data: Sequence[str]) -> list:
    """The distinct tokenizer folders that the prefixes' PREFIX.meta.json name (the --tokenizer-model
    tools/preprocess_data.py was given, as typed), those that hold a tokenizer.json from here."""
    from spiral_megatron.job.data.preprocess import recorded_tokenizer

    named = (recorded_tokenizer(prefix) for prefix in _prefixes(data))
    return sorted({Path(name) for name in named if name and (Path(name) / "tokenizer.json").is_file()})


def _prefixes(data: Sequence[str]) -> list:
    from megatron.core.datasets.utils import get_blend_from_list

    try:
        return get_blend_from_list(list(data))[0]
    except Exception:  # a bad weight: job/data/datasets.py refuses it in one line
        return []


def resolve_tokenizer(cfg: TrainingConfig, explicit_vocab: bool) -> TrainingConfig:
    """Fill `tokenizer` for data made by tools/preprocess_data.py (its tokenizer lies beside the
    data as <prefix>_tokenizer) and `tokenizer_vocab_size` from the tokenizer, so the resolved
    config shows what the model uses; a contradicting tokenizer_vocab_size is refused."""
    data = cfg.data_path or cfg.train_data_path
    if cfg.tokenizer is None and data and not cfg.mock_data:
        found, recorded = tokenizers_beside(data), False
        if not found:
            found, recorded = tokenizers_recorded(data), True
        if len(found) > 1:
            raise ConfigError(f"data_path {list(data)}: its parts lie beside different tokenizers "
                              f"({', '.join(map(str, found))}): pass --tokenizer-model with the one the data "
                              "was made with")
        if found:
            beside = found[0]
            cfg = dataclasses.replace(cfg, tokenizer=str(beside))
            whose = str(beside)[: -len("_tokenizer")]
            more = "; every part of the blend is checked against it" if len(data) > 1 else ""
            how = ("the one the data's .meta.json names" if recorded
                   else f"written beside {whose} by tools/preprocess_data.py")
            if os.environ.get("RANK", "0") == "0":  # every rank reads the keys
                print(f"tokenizer: {beside} ({how}{more})", flush=True)
    if cfg.tokenizer is None:
        return cfg
    try:
        vocab = Tokenizer.load(cfg.tokenizer).vocab_size
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # tokenizers raises on a file that is not a tokenizer
        raise ConfigError(f"tokenizer {cfg.tokenizer!r}: not a Hugging Face tokenizer.json ({e})") from None
    if explicit_vocab and cfg.tokenizer_vocab_size != vocab:
        raise ConfigError(f"tokenizer_vocab_size {cfg.tokenizer_vocab_size} contradicts tokenizer "
                          f"{cfg.tokenizer!r}, which has {vocab} tokens (leave it out)")
    return dataclasses.replace(cfg, tokenizer_vocab_size=vocab)

