"""TrainingConfig: one flat, typed set of keys, read from YAML and `--key value` overrides.

Every key has a type and a one-line docstring; unknown keys, values of the wrong type and
impossible combinations raise `ConfigError` naming the key and the value, before any compute.
The model is a flavor name plus SpiralConfig overrides: `model: {flavor: debug, hidden_size: 128}`
in YAML, `--model.hidden_size 128` on the command line.
"""

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
BACKENDS = ("auto", "gloo", "nccl")


class ConfigError(ValueError):
    """A bad key, value or combination in the training config."""


@dataclass
class TrainingConfig:
    """Everything `pretrain_spiral.py` needs; the resolved copy is saved beside each checkpoint."""

    model: Dict[str, Any] = field(default_factory=lambda: {"flavor": "debug"})
    """`flavor` (see spiral_megatron.flavors) plus any SpiralConfig field overrides."""

    seq_length: Optional[int] = None
    """Tokens per sample; None = the flavor's."""

    tensor_parallel: int = 1
    """Tensor model parallel size."""

    pipeline_parallel: int = 1
    """Pipeline model parallel size; where the loop goes: `model.loop_placement`, `model.pipeline_split`."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_parallel > 1)."""

    micro_batch_size: int = 8
    """Samples per micro-batch per data-parallel rank."""

    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills it)."""

    train_iters: int = 300
    """Optimizer steps to train for."""

    exit_interval: Optional[int] = None
    """Save and stop after this iteration (the schedule still assumes train_iters)."""

    lr: float = 3e-3
    """Peak learning rate."""

    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""

    lr_warmup_iters: int = 0
    """Linear warmup steps from 0 to lr (excludes lr_warmup_fraction)."""

    lr_warmup_fraction: Optional[float] = None
    """Warmup as a fraction of lr_decay_iters (or train_iters), as Megatron-LM's; None = use
    lr_warmup_iters."""

    lr_decay_iters: Optional[int] = None
    """Steps over which lr decays to min_lr; None = train_iters."""

    lr_decay_style: str = "cosine"
    """One of LR_DECAY_STYLES."""

    weight_decay: float = 0.1
    """AdamW weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.95
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""

    precision: str = "fp32"
    """"fp32", "bf16" or "fp16" (fp16 uses Megatron's dynamic loss scaling). CPU: fp32 only."""

    loss_scale: Optional[float] = None
    """fp16 only: a static loss scale; None = dynamic."""

    fp8: Optional[str] = None
    """Transformer Engine FP8 format ("e4m3" or "hybrid"); None = off. Needs GPUs and TE."""

    fp8_recipe: str = "tensorwise"
    """TE FP8 recipe; the looped core needs a per-call recipe (docs/MEGATRON-ON-CPU.md)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    seed: int = 1234
    """Seed for model init and the training data order."""

    valid_seed: int = 1234
    """Seed of the validation samples' order, apart from `seed` so that runs of any seed score
    the same validation sequences."""

    data_path: Optional[List[str]] = None
    """Indexed dataset prefixes, optionally weighted ("0.7 a 0.3 b"), divided by `split`;
    None = the embedded corpus (or train_data_path and valid_data_path)."""

    train_data_path: Optional[List[str]] = None
    """Training data used whole, as Megatron-LM's --train-data-path (excludes data_path)."""

    valid_data_path: Optional[List[str]] = None
    """Validation data used whole, as Megatron-LM's --valid-data-path (with train_data_path)."""

    mock_data: bool = False
    """Train on Megatron's MockGPTDataset (random tokens) instead of text."""

    split: Optional[str] = None
    """Train/valid/test split of data_path's documents, as Megatron's --split (the test part is
    never read); None = 969,30,1, or for data too small for it the fewest last documents that
    fill a validation sample (printed)."""

    tokenizer: Optional[str] = None
    """Folder or tokenizer.json of a Hugging Face tokenizer; None = the embedded corpus's."""

    tokenizer_vocab_size: int = 512
    """Vocabulary of the BPE trained on the embedded corpus (or of mock data); with `tokenizer`,
    read from it."""

    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this x tensor_parallel."""

    cache_dir: Optional[str] = None
    """Where the embedded corpus and dataset indices are cached; None = $SPIRAL_CACHE or
    ~/.cache/spiral_megatron."""

    log_interval: int = 10
    """Log every this many steps."""

    eval_interval: Optional[int] = 100
    """Evaluate every this many steps and at the end; None = never."""

    eval_iters: int = 10
    """Validation batches per evaluation."""

    save: Optional[str] = "checkpoints/debug"
    """Checkpoint folder; None = do not save."""

    save_interval: Optional[int] = None
    """Save every this many steps (and always at the end); None = only at the end."""

    load: Optional[str] = None
    """Resume from this checkpoint folder (its latest_checkpointed_iteration.txt)."""

    async_save: bool = False
    """Write checkpoints in a background process (Megatron's async save) while training goes on."""

    no_load_optim: bool = False
    """On resume, start the optimizer fresh: load weights, LR schedule, data position (Megatron-LM's flag)."""

    no_load_rng: bool = False
    """On resume, keep this run's RNG states instead of the checkpoint's (Megatron-LM's flag)."""

    dist_ckpt_optim_fully_reshardable: bool = False
    """Save distributed-optimizer state in a format that reloads at any TP/PP layout; the default
    reloads at the saved TP/PP only but writes without gathering (Megatron-LM's flag)."""

    override_opt_param_scheduler: bool = False
    """On resume, this run's LR schedule replaces the checkpoint's (Megatron-LM's flag)."""

    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, the checkpoint's LR schedule is kept, not this run's (Megatron-LM's flag)."""

    check_for_spiky_loss: bool = False
    """Stop, before saving, at a loss 10x the largest of the first 100 steps (Megatron-LM's flag)."""

    check_for_large_grads: bool = False
    """Stop, before saving, at a gradient norm 10x the largest of the first 100 steps."""

    log_json: Optional[str] = None
    """Append one JSON object per logged step to this file."""

    tensorboard_dir: Optional[str] = None
    """TensorBoard event folder (needs the `tensorboard` package)."""

    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s per device for MFU; None = from the GPU's name (unknown on CPU)."""

    check_memory: bool = True
    """Refuse, before the first step, a run whose estimated memory per process (a lower bound,
    training/memory.py) exceeds what the device or host has."""

    backend: str = "auto"
    """torch.distributed backend: "auto" (nccl with CUDA, else gloo), "gloo" or "nccl"."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainingConfig)}
_TYPES = typing.get_type_hints(TrainingConfig)


def _coerce(key: str, value: Any, tp) -> Any:
    """`value` as type `tp`, or a ConfigError naming key and value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin in (list, List):
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not a list")
        return [_coerce(key, v, args[0]) for v in value]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: {value!r} is not of type {getattr(tp, '__name__', tp)}")


def apply(cfg: TrainingConfig, overrides: Dict[str, Any]) -> TrainingConfig:
    """`cfg` with `overrides` applied; `model.<field>` keys go into the model mapping."""
    from spiral_megatron.training import cli

    values = cfg.to_dict()
    for raw_key, raw_value in overrides.items():
        pairs = cli.canonical(raw_key, raw_value, _FIELDS)
        if not pairs:
            raise ConfigError(cli.unknown_key_message(raw_key, raw_value, _FIELDS))
        for key, value in pairs:
            if key.startswith("model."):
                values["model"] = {**values["model"], key[len("model."):]: value}
            elif key == "model" and isinstance(value, str):
                values["model"] = {"flavor": value}
            elif key == "model" and not isinstance(value, dict):
                raise ConfigError(f"model: {value!r} must be a flavor name or a mapping of fields")
            else:
                values[key] = _coerce(key, value, _TYPES[key])
    return TrainingConfig(**values)


def parse_cli(argv: Sequence[str]) -> Dict[str, Any]:
    """`--key value`, `--key=value` and bare `--flag` (= true) into an ordered mapping.

    Values are read as YAML scalars (`8`, `true`, `[1, 2]`); types are enforced by `apply`.
    """
    out, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"expected --key, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        try:
            out[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key] = value
        i += 1
    return out


def load(argv: Sequence[str], default_path: Optional[Path] = None) -> TrainingConfig:
    """The config from `--config PATH` (else `default_path`) plus the other `--key value` pairs."""
    overrides = parse_cli(argv)
    path = overrides.pop("config", None) or default_path
    data = read_yaml(Path(path)) if path is not None else {}
    cfg = apply(TrainingConfig(), data)
    cfg = apply(cfg, _drop_excluded(data, overrides))
    cfg = resolve_tokenizer(cfg, explicit_vocab="tokenizer_vocab_size" in {**overrides, **data})
    check(cfg)
    return cfg


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
EXCLUSIVE = (("lr_warmup_iters", "lr_warmup_fraction"), ("data_path", "train_data_path"))


def _drop_excluded(data: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """`overrides`, plus a reset to the default of each YAML key the command line excludes."""
    given = {k.replace("-", "_") for k in overrides}
    resets = {b: _FIELDS[b].default for a, b in EXCLUSIVE if a in given and b in data and b not in given}
    resets.update({a: _FIELDS[a].default for a, b in EXCLUSIVE if b in given and a in data and a not in given})
    return {**resets, **overrides}


def resolve_tokenizer(cfg: TrainingConfig, explicit_vocab: bool) -> TrainingConfig:
    """Fill `tokenizer` for data made by tools/preprocess_data.py (its tokenizer lies beside the
    data as <prefix>_tokenizer) and `tokenizer_vocab_size` from the tokenizer, so the resolved
    config shows what the model uses; a contradicting tokenizer_vocab_size is refused."""
    data = cfg.data_path or cfg.train_data_path
    if cfg.tokenizer is None and data and not cfg.mock_data:
        beside = Path(data[-1] + "_tokenizer")
        if len(data) == 1 and (beside / "tokenizer.json").is_file():
            cfg = dataclasses.replace(cfg, tokenizer=str(beside))
            if os.environ.get("RANK", "0") == "0":  # config.load runs on every rank
                print(f"tokenizer: {beside} (written beside {data[-1]} by tools/preprocess_data.py)", flush=True)
    if cfg.tokenizer is None:
        return cfg
    from spiral_megatron.training.tokenizer import Tokenizer

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


def warmup_iters(cfg: TrainingConfig) -> int:
    """Warmup steps: lr_warmup_fraction of the decay steps (Megatron-LM), else lr_warmup_iters."""
    if cfg.lr_warmup_fraction is not None:
        return int(round(cfg.lr_warmup_fraction * (cfg.lr_decay_iters or cfg.train_iters)))
    return cfg.lr_warmup_iters


def check(cfg: TrainingConfig) -> None:
    """Refuse impossible values and combinations (see checks.py)."""
    from spiral_megatron.training import checks

    checks.check(cfg)


def seq_length(cfg: TrainingConfig) -> int:
    """The training sequence length: the key, else the flavor's."""
    from spiral_megatron import flavors

    return cfg.seq_length or flavors.get(cfg.model["flavor"]).seq_length


def model_overrides(cfg: TrainingConfig) -> Dict[str, Any]:
    """The SpiralConfig overrides of `cfg.model` (all but `flavor`); SpiralConfig parses
    list fields given as strings ("8,4,2,1", "3,3")."""
    return {k: v for k, v in cfg.model.items() if k != "flavor"}


def check_world(cfg: TrainingConfig, world_size: int) -> int:
    """Refuse a layout the world size cannot hold; returns the data-parallel size."""
    from spiral_megatron.training import checks

    return checks.check_world(cfg, world_size)
