"""Datasets (Megatron's GPTDataset / MockGPTDataset, blended and split) and the batch order.

Sample order follows Megatron's pretraining sampler: the global batch of step i is samples
[i * global_batch, (i + 1) * global_batch) of the train dataset; each micro-step takes the
next micro_batch x dp of them and data-parallel rank r keeps its slice. So the data position
is one number, `consumed_samples`, which the checkpoint stores.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from spiral_megatron.training.config import ConfigError, TrainingConfig


@dataclass
class DataSource:
    """Where the tokens come from: a Megatron blend (None = mock data) and the tokenizer."""

    blend: Optional[Tuple[List[str], Optional[List[float]]]]
    tokenizer_path: Optional[Path]


def resolve(cfg: TrainingConfig, build_default: bool) -> DataSource:
    """The blend and tokenizer of `cfg`; the embedded corpus (built if `build_default`) when
    no data_path is given. Missing files raise ConfigError naming them."""
    from megatron.core.datasets.utils import get_blend_from_list

    from spiral_megatron.training import default_data

    if cfg.data_path:
        try:
            blend = get_blend_from_list(cfg.data_path)
        except Exception as e:  # Megatron raises on a bad weight
            raise ConfigError(f"data_path {cfg.data_path}: {e}") from None
        for prefix in blend[0]:
            for ext in (".bin", ".idx"):
                if not Path(prefix + ext).is_file():
                    raise ConfigError(f"data_path: {prefix + ext!r} does not exist "
                                      "(make it with tools/preprocess_data.py)")
        tokenizer = Path(cfg.tokenizer) if cfg.tokenizer else None
        if tokenizer is None and not cfg.mock_data:
            raise ConfigError(f"data_path {cfg.data_path} needs a tokenizer (the one the data was made with)")
    elif cfg.mock_data:
        blend, tokenizer = None, Path(cfg.tokenizer) if cfg.tokenizer else None
    else:
        ensure = default_data.ensure if build_default else default_data.paths
        prefix, default_tok = ensure(cfg.cache_dir, cfg.tokenizer_vocab_size)
        blend, tokenizer = ([prefix], None), Path(cfg.tokenizer) if cfg.tokenizer else default_tok
    if tokenizer is not None and not (tokenizer.is_file() or (tokenizer / "tokenizer.json").is_file()):
        raise ConfigError(f"tokenizer {str(tokenizer)!r}: no tokenizer.json there")
    return DataSource(blend, tokenizer)


class _MockTokenizer:
    """What MockGPTDataset needs when no tokenizer is given: a vocabulary and an eod id."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod = vocab_size, vocab_size - 1
        self.unique_identifiers = {"class": "mock", "vocab_size": vocab_size}


def load_tokenizer(source: DataSource, vocab_size: int):
    from spiral_megatron.training.tokenizer import Tokenizer

    return Tokenizer.load(source.tokenizer_path) if source.tokenizer_path else _MockTokenizer(vocab_size)


def build_datasets(cfg: TrainingConfig, source: DataSource, tokenizer, seq_length: int,
                   num_samples: Tuple[int, int]):
    """(train, valid) datasets of `num_samples` samples each, built on every rank."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    from spiral_megatron.training import default_data

    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=seq_length,
        blend=source.blend,
        split=cfg.split,
        path_to_cache=str(default_data.cache_root(cfg.cache_dir) / "indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model's attention is causal without a mask
    )
    cls = MockGPTDataset if source.blend is None else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(
        cls, [num_samples[0], num_samples[1], 0], lambda: True, config
    ).build()
    if train is None or valid is None or len(valid) == 0:
        raise ConfigError(f"split {cfg.split!r} leaves no train or validation documents")
    return train, valid


def _collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}  # [b, s]


def micro_batches(dataset, start: int, micro_batch_size: int, dp_rank: int, dp_size: int
                  ) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's micro-batches from sample `start` on, wrapping around the dataset."""
    index, step = start, micro_batch_size * dp_size
    while True:
        first = index + dp_rank * micro_batch_size
        yield _collate([dataset[(first + k) % len(dataset)] for k in range(micro_batch_size)])
        index += step
