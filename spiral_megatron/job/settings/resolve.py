"""One resolution per job: YAML + command line + flavor + Megatron-LM's fusion defaults + the
job's keys -> one immutable `Resolved`, checked once (docs/CONFIG.md, "How a setting flows").

Everything after it (job/build.py, job/data/, job/checkpoint/, job/run/) reads the Resolved
object it is given and never derives a setting again: the flavor is looked up, the fusion
defaults decided, the SpiralConfig built and the model's record (model_args.json) made here,
each once. What the job records beside each checkpoint comes from it: `keys` as config.yaml,
`model_args` as model_args.json.
"""

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch

from spiral_megatron.config import flavors
from spiral_megatron.config.spiral_config import SpiralConfig
from spiral_megatron.model import fusions
from spiral_megatron.model.model_args import ModelArgs
from spiral_megatron.job.data.data_settings import DataSettings
from spiral_megatron.job.settings import checks, config, model_config, model_fields, training
from spiral_megatron.job.settings.keys import TrainingConfig, model_overrides


@dataclass(frozen=True)
class Resolved:
    """A job's settings, resolved once. Builders get copies of the Megatron configs in it
    (`model`, `ddp`, `optimizer`): Megatron writes into the configs it is handed."""

    keys: TrainingConfig
    """The keys as asked (typed, the data's tokenizer filled in); saved as config.yaml."""

    on_cpu: bool
    """No CUDA: gloo, CPU initialisation, no fused kernels."""

    flavor: str
    """The flavor the model starts from."""

    model: SpiralConfig
    """The model's config: flavor | fusion defaults | model.<field> | the job's keys."""

    model_kwargs: Mapping[str, Any]
    """The arguments `model` was built from (read-only): what a config that validates later is
    made of, as Megatron-Bridge's model provider is (spiral_megatron/bridge/recipes.py)."""

    backend: str
    """The layer-spec backend: "local" or "transformer_engine"."""

    fusion_notes: Tuple[str, ...]
    """One line per fusion Megatron-LM would turn on that is off here, and why (GPUs only)."""

    model_args: ModelArgs
    """The model's record (model_args.json): its function, padded vocabulary, sequence length."""

    seq_length: int
    """Tokens per sample: the key, else the flavor's."""

    dtype: torch.dtype
    """Parameters' dtype (the precision)."""

    ddp: object
    """Megatron's DistributedDataParallelConfig."""

    optimizer: object
    """Megatron's OptimizerConfig."""

    schedule: training.Schedule
    """Megatron's OptimizerParamScheduler arguments."""

    data: DataSettings
    """What data the job reads (job/data/)."""

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: the tokenizer's vocabulary padded as Megatron pads it."""
        return self.model_args.vocab_size


def resolve(argv: Sequence[str], default_config: Optional[Path] = None,
            on_cpu: Optional[bool] = None) -> Resolved:
    """The job of command line `argv` (`--config PATH`, else `default_config`, plus `--key value`
    pairs); `on_cpu`: None = this machine (no CUDA). Raises ConfigError naming a bad key."""
    return resolve_keys(config.read(argv, default_config), on_cpu)


def resolve_keys(keys: TrainingConfig, on_cpu: Optional[bool] = None) -> Resolved:
    """The job of `keys` (typed, as config.read makes them), checked."""
    on_cpu = not torch.cuda.is_available() if on_cpu is None else on_cpu
    checks.check(keys)
    flavor = flavors.get(keys.model["flavor"])
    seq = keys.seq_length or flavor.seq_length
    overrides = model_fields.as_config_kwargs(model_overrides(keys))
    arch = {**flavor.model, **overrides}
    checks.check_heads(keys, arch)
    backend = model_config.backend(keys, on_cpu)
    fused, notes = fusions.defaults(not on_cpu, backend, arch)
    kwargs = MappingProxyType({**flavor.model, **fused, **overrides,
                               **model_config.job_fields(keys, on_cpu, backend)})
    spiral = model_config.build(keys, kwargs)
    vocab = padded_vocab(keys.tokenizer_vocab_size, keys.make_vocab_size_divisible_by, keys.tensor_parallel)
    checks.check_model(keys, spiral, seq, vocab)
    return Resolved(
        keys=keys, on_cpu=on_cpu, flavor=flavor.name, model=spiral, model_kwargs=kwargs, backend=backend,
        fusion_notes=tuple(notes),
        model_args=ModelArgs.from_config(spiral, vocab_size=vocab, max_sequence_length=seq,
                                         rotary_base=keys.rotary_base, rotary_percent=keys.rotary_percent),
        seq_length=seq, dtype=model_config.DTYPES[keys.precision], ddp=training.ddp_config(keys),
        optimizer=training.optimizer_config(keys), schedule=training.schedule(keys), data=data_settings(keys, seq),
    )


def padded_vocab(vocab_size: int, divisible_by: int = 128, tensor_parallel: int = 1) -> int:
    """Embedding rows: `vocab_size` padded to a multiple of make_vocab_size_divisible_by x TP (Megatron's)."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def data_settings(keys: TrainingConfig, seq: int) -> DataSettings:
    """The data part of the keys, for job/data/ (which does not read the keys)."""
    def paths(value):
        return tuple(value) if value else None

    return DataSettings(
        data_path=paths(keys.data_path), train_data_path=paths(keys.train_data_path),
        valid_data_path=paths(keys.valid_data_path), mock_data=keys.mock_data, split=keys.split,
        tokenizer=keys.tokenizer, vocab_size=keys.tokenizer_vocab_size, cache_dir=keys.cache_dir,
        seq_length=seq, eod_mask_loss=keys.eod_mask_loss, mmap_bin_files=keys.mmap_bin_files, seed=keys.seed,
        valid_seed=keys.valid_seed, evaluate=bool(keys.eval_interval),
        train_samples=keys.train_samples or keys.train_iters * keys.global_batch_size,
        valid_samples=max(keys.eval_iters * keys.global_batch_size, 1),
    )
