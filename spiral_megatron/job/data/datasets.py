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
import torch.distributed as dist

from spiral_megatron.errors import ConfigError
from spiral_megatron.job.data.data_settings import DataSettings


Blend = Tuple[List[str], Optional[List[float]]]


@dataclass
class DataSource:
    """Where the tokens come from. `train`/`valid`: Megatron blends (None = mock data), either
    one blend divided by `split` (None = the default, see dataset_check.choose_split) or, when
    `whole`, two blends each used whole."""

    train: Optional[Blend]
    valid: Optional[Blend]
    split: Optional[str]
    whole: bool
    tokenizer_path: Optional[Path]


def _blend(key: str, paths: List[str]) -> Blend:
    from megatron.core.datasets.utils import get_blend_from_list

    try:
        return get_blend_from_list(paths)
    except Exception as e:  # Megatron raises on a bad weight
        raise ConfigError(f"{key} {paths}: {e}") from None


def resolve(cfg: DataSettings, build_default: bool) -> DataSource:
    """The blends and tokenizer of `cfg`; the embedded corpus (built if `build_default`) when
    no data path is given. Missing files raise ConfigError naming them."""
    from spiral_megatron.job.data import default_data

    tokenizer = Path(cfg.tokenizer) if cfg.tokenizer else None
    if cfg.data_path or cfg.train_data_path:
        from spiral_megatron.job.data.dataset_check import not_a_dataset

        if cfg.data_path:
            train = valid = _blend("data_path", list(cfg.data_path))
        else:
            train = _blend("train_data_path", list(cfg.train_data_path))
            valid = _blend("valid_data_path", list(cfg.valid_data_path)) if cfg.valid_data_path else None
        keys = ("data_path", "data_path") if cfg.data_path else ("train_data_path", "valid_data_path")
        for key, blend in zip(keys, (train, valid)):
            for prefix in blend[0] if blend else ():
                why = not_a_dataset(key, prefix)
                if why:
                    raise ConfigError(why)
        if tokenizer is None:
            from spiral_megatron.job.data.preprocess import recorded_tokenizer

            first = (train or valid)[0][0]
            named = recorded_tokenizer(first)
            made = f"; {first}.meta.json says it was made with {named!r}, not found from here" if named else ""
            raise ConfigError(f"data_path {list(cfg.data_path or cfg.train_data_path)} needs a tokenizer "
                              f"(the one the data was made with): --tokenizer-model FOLDER{made}")
    elif cfg.mock_data:
        train = valid = None
    else:
        ensure = default_data.ensure if build_default else default_data.paths
        prefix, default_tok = ensure(cfg.cache_dir, cfg.vocab_size)
        train = valid = ([prefix], None)
        tokenizer = tokenizer or default_tok
    if tokenizer is not None and not (tokenizer.is_file() or (tokenizer / "tokenizer.json").is_file()):
        raise ConfigError(f"tokenizer {str(tokenizer)!r}: no tokenizer.json there")
    return DataSource(train, valid, cfg.split, bool(cfg.train_data_path), tokenizer)


class _MockTokenizer:
    """What MockGPTDataset needs when no tokenizer is given: a vocabulary and an eod id."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod = vocab_size, vocab_size - 1
        self.unique_identifiers = {"class": "mock", "vocab_size": vocab_size}


def load_tokenizer(source: DataSource, vocab_size: int):
    from spiral_megatron.job.data.tokenizer import Tokenizer

    return Tokenizer.load(source.tokenizer_path) if source.tokenizer_path else _MockTokenizer(vocab_size)


def check(cfg: DataSettings, source: DataSource, tokenizer) -> str:
    """Refuse a tokenizer of another vocabulary than the model's, and data that cannot fill the
    run's splits (dataset_check.py), cheaply, before the model is built; returns the split to
    use (the default adapts to small data, printed)."""
    from spiral_megatron.job.data import dataset_check

    if tokenizer.vocab_size != cfg.vocab_size:  # only the embedded corpus's BPE can differ
        raise ConfigError(f"tokenizer_vocab_size {cfg.vocab_size}: the tokenizer {str(source.tokenizer_path)!r} "
                          f"has {tokenizer.vocab_size} tokens (a byte-level BPE has at least 257, and the "
                          f"embedded corpus holds no more merges than its text); set tokenizer_vocab_size "
                          f"{tokenizer.vocab_size}")
    seq_length = cfg.seq_length
    split = source.split or dataset_check.DEFAULT_SPLIT
    train = None  # the train blend's corpora
    if source.whole:
        for name, blend in (("train", source.train), ("valid", source.valid)):
            if name in cfg.needed():
                corpora = [dataset_check.open_corpus(p, tokenizer) for p in blend[0]]
                dataset_check.check_splits(corpora, None, [name], seq_length + 1)
                train = corpora if name == "train" else train
    elif source.train is not None:
        train = [dataset_check.open_corpus(p, tokenizer) for p in source.train[0]]
        split, note = dataset_check.choose_split(train, source.split, list(cfg.needed()), seq_length + 1)
        _say(note)
    if train:
        times = dataset_check.epochs(train, source.train[1], None if source.whole else split, cfg.train_samples,
                                     seq_length)
        if max(times) > 1:
            parts = f" ({', '.join(f'{c.prefix} {t:.1f}' for c, t in zip(train, times))})" if len(train) > 1 else ""
            _say(f"epochs: this run reads its train split {max(times):.1f} times{parts}: Megatron repeats the data, "
                 "reshuffled each epoch")
    return split


def _say(line: Optional[str]) -> None:
    """Print `line` once (rank 0)."""
    if line and (not dist.is_initialized() or dist.get_rank() == 0):
        print(line, flush=True)


def build_datasets(cfg: DataSettings, source: DataSource, tokenizer, split: str):
    """(train, valid) datasets of cfg.train_samples and cfg.valid_samples samples, built on every
    rank; valid is None when the run never evaluates. Each is built alone (the test split never
    is), the valid one with `valid_seed`. `split`: from `check`."""
    train = _build(cfg, source, tokenizer, split, 0, cfg.train_samples, cfg.seed)
    valid = _build(cfg, source, tokenizer, split, 1, cfg.valid_samples, cfg.valid_seed) if cfg.evaluate else None
    return train, valid


def _build(cfg: DataSettings, source: DataSource, tokenizer, split: str, index: int, num_samples: int,
           seed: int):
    """The dataset of split `index` (0 train, 1 valid) alone, with `seed`."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    from spiral_megatron.job.data import default_data

    blend = source.train if index == 0 else source.valid
    whole = source.whole
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=cfg.seq_length,
        blend=None if whole else blend,
        blend_per_split=[blend if i == index else None for i in range(3)] if whole else None,
        split=None if whole else split,
        path_to_cache=str(default_data.cache_root(cfg.cache_dir) / "indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        mmap_bin_files=cfg.mmap_bin_files,
        create_attention_mask=False,  # the model's attention is causal without a mask
    )
    if not whole:  # build this split only: Megatron would also build (and loop on) the others
        config.split_matrix = [m if i == index else None for i, m in enumerate(config.split_matrix)]
    sizes = [num_samples if i == index else 0 for i in range(3)]
    cls = MockGPTDataset if blend is None else GPTDataset
    dataset = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()[index]
    if dataset is None or len(dataset) == 0:
        raise ConfigError(f"split {split!r} leaves the {('train', 'valid')[index]} split empty")
    return dataset


def _collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}  # [b, s]


class BatchOrder(torch.utils.data.Sampler):
    """This rank's sample indices of each micro-batch from sample `start` on, wrapping around
    the dataset: Megatron's pretraining order (module docstring), endless."""

    def __init__(self, size: int, start: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.size, self.start, self.micro_batch_size = size, start, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __iter__(self) -> Iterator[List[int]]:
        index, step = self.start, self.micro_batch_size * self.dp_size
        while True:
            first = index + self.dp_rank * self.micro_batch_size
            yield [(first + k) % self.size for k in range(self.micro_batch_size)]
            index += step


def _ignore_job_signals(worker_id: int) -> None:
    """A loader worker leaves SIGTERM/SIGINT to the trainer, which saves before exiting (a
    scheduler signals every process of the job); the worker ends with its parent."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def micro_batches(dataset, start: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  num_workers: int = 2) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's micro-batches from sample `start` on (BatchOrder), read by `num_workers`
    loader processes (0: in this thread) into pinned memory on a GPU machine, as Megatron-LM's
    DataLoader, so that the step's host-to-device copies are asynchronous (issue 15)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=BatchOrder(len(dataset), start, micro_batch_size, dp_rank, dp_size),
        collate_fn=_collate, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        worker_init_fn=_ignore_job_signals if num_workers else None)
    return iter(loader)
