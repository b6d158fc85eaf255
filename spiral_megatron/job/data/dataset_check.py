"""Inspect indexed datasets before Megatron builds samples from them, and plan the split.

Megatron's dataset builder loops forever on a split that holds no tokens (`_get_num_epochs`
adds 0 tokens per epoch until it reaches the request), so a small corpus of one's own with the
default `--split 969,30,1` used to hang. Here every prefix is opened once on one rank and
refused in one line when it is damaged (a junk or truncated `.bin`/`.idx`), empty, was made
by another tokenizer (the digest `PREFIX.meta.json` records, see preprocess.py), holds token
ids the tokenizer does not have, or when a split the run needs cannot fill one sample; the
refusal names the split and a `--split` that would work.

The document ranges of a split are Megatron's (`BlendedMegatronDatasetBuilder`): sequence
range [round(b0 * N), round(b1 * N)) for the bookends (b0, b1) of the normalised split.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from spiral_megatron.errors import ConfigError

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT = "969,30,1"  # Megatron-LM's
SCAN_TOKENS = 1 << 30  # token-id range check covers at most this many tokens per prefix


@dataclass
class Corpus:
    """One indexed dataset: its prefix, sequence lengths and token dtype."""

    prefix: str
    lengths: np.ndarray  # [num_sequences] tokens per sequence (one per document here)
    max_token: int  # largest token id seen (over the first SCAN_TOKENS tokens)
    scanned_all: bool


def parse_split(split: str) -> List[float]:
    """'969,30,1' -> normalised [train, valid, test] weights; ConfigError on anything else."""
    parts = [p for p in re.split(r"[,/\s]+", str(split).strip()) if p]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"split {split!r} must be up to 3 non-negative numbers with a positive sum, "
                          "train,valid,test, e.g. 969,30,1")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_ranges(num: int, weights: Sequence[float]) -> List[Tuple[int, int]]:
    """Megatron's [begin, end) sequence range of each split for `num` sequences."""
    bounds = np.cumsum([0.0, *weights])
    return [(int(round(bounds[i] * num)), int(round(bounds[i + 1] * num))) for i in range(3)]


def check_tokenizer(prefix: str, tokenizer) -> None:
    """Refuse data whose PREFIX.meta.json names another tokenizer than the run's, by name and
    digest (same-size vocabularies map the same ids to other text, so the id range check alone
    lets such data train). Data without the record, or a tokenizer without a digest, passes."""
    from spiral_megatron.job.data.preprocess import meta_path

    new = getattr(tokenizer, "unique_identifiers", {}).get("sha256")
    if new is None or not meta_path(prefix).is_file():
        return
    meta = json.loads(meta_path(prefix).read_text())
    if meta.get("tokenizer_sha256", new) not in getattr(tokenizer, "digests", (new,)):  # older records: the 2nd
        made_by = meta.get("tokenizer") or "another tokenizer"
        raise ConfigError(
            f"data_path {prefix!r} was made with the tokenizer {made_by!r} ({meta.get('tokenizer_vocab_size')} "
            f"tokens, sha256 {meta['tokenizer_sha256']}), not this run's {getattr(tokenizer, 'path', None)!r} "
            f"({tokenizer.vocab_size} tokens, sha256 {new}): pass --tokenizer-model {made_by}, or remake the data "
            f"with tools/preprocess_data.py --tokenizer-model {getattr(tokenizer, 'path', None) or 'FOLDER'}")


def not_a_dataset(key: str, prefix: str) -> Optional[str]:
    """Why `prefix` (of data key `key`) is not a Megatron dataset prefix (PREFIX.bin and
    PREFIX.idx), saying what to pass instead; None when it is one."""
    missing = [prefix + ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
    if not missing:
        return None
    path = Path(prefix)
    make = (f"make one with `python tools/preprocess_data.py --input {prefix} --output-prefix data/{path.stem or 'mine'}`,"
            f" then pass --{key.replace('_', '-')} data/{path.stem or 'mine'}")
    if path.suffix in (".bin", ".idx") and not not_a_dataset(key, prefix[: -len(path.suffix)]):
        return f"{key} {prefix!r}: pass the dataset's prefix, without {path.suffix}: {prefix[: -len(path.suffix)]!r}"
    if path.is_file():
        return f"{key} {prefix!r} is a text file, not a Megatron dataset (PREFIX.bin + PREFIX.idx): {make}"
    if path.is_dir():
        inside = sorted(str(p.with_suffix("")) for p in path.glob("*.idx") if p.with_suffix(".bin").is_file())
        if inside:
            return f"{key} {prefix!r} is a folder: pass a dataset prefix in it ({', '.join(inside[:4])}), or a blend"
        return f"{key} {prefix!r} is a folder holding no Megatron dataset (PREFIX.bin + PREFIX.idx): {make}"
    return f"{key}: {missing[0]!r} does not exist (make it with tools/preprocess_data.py)"


def open_corpus(prefix: str, tokenizer) -> Corpus:
    """Read `prefix`.idx/.bin; ConfigError naming the file when either is not a whole dataset or
    does not fit `tokenizer` (the run's: its `vocab_size`, digest and path where known; None
    checks nothing)."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    why = not_a_dataset("data_path", prefix)
    if why:
        raise ConfigError(why)
    if bin_.stat().st_size == 0:
        raise ConfigError(f"data_path {prefix!r} holds no tokens ({str(bin_)!r} is empty)")
    with open(idx, "rb") as f:
        if f.read(len(_INDEX_HEADER)) != _INDEX_HEADER:
            raise ConfigError(f"data_path: {str(idx)!r} is not a Megatron indexed dataset index "
                              "(no MMIDIDX header); rebuild it with tools/preprocess_data.py")
    try:
        ds = IndexedDataset(prefix, mmap=True)
        lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
        dtype = np.dtype(ds.index.dtype)
    except Exception as e:  # Megatron asserts on a bad header, numpy raises on a short file
        raise ConfigError(f"data_path: {str(idx)!r} is not a Megatron indexed dataset index "
                          f"({type(e).__name__}: {e or 'bad header'})") from None
    expected = int(lengths.sum()) * dtype.itemsize
    if bin_.stat().st_size != expected:
        raise ConfigError(f"data_path: {str(bin_)!r} has {bin_.stat().st_size} bytes but its index "
                          f"describes {expected} ({lengths.size} sequences of {dtype.name}): truncated "
                          "or from another dataset; rebuild it with tools/preprocess_data.py")
    if lengths.size == 0 or expected == 0:
        raise ConfigError(f"data_path {prefix!r} holds no tokens ({lengths.size} documents)")
    check_tokenizer(prefix, tokenizer)
    vocab_size = getattr(tokenizer, "vocab_size", None)
    tokens = np.memmap(bin_, dtype=dtype, mode="r")
    scanned = tokens[:SCAN_TOKENS]
    corpus = Corpus(prefix, lengths, int(scanned.max()), scanned.size == tokens.size)
    if vocab_size is not None and corpus.max_token >= vocab_size:
        where = int(np.argmax(scanned >= vocab_size))
        raise ConfigError(f"data_path {prefix!r}: token id {corpus.max_token} (first bad one at token "
                          f"{where}) is beyond the tokenizer's vocabulary of {vocab_size}; the data was "
                          "made with another tokenizer")
    return corpus


def check_splits(corpora: Sequence[Corpus], split: Optional[str], needed: Sequence[str],
                 sample_tokens: int) -> None:
    """Refuse when a split in `needed` cannot fill one sample of `sample_tokens` tokens in some
    corpus, naming it and a --split that would work. `split` None: each corpus is whole."""
    if split is None:
        for c in corpora:
            if int(c.lengths.sum()) < sample_tokens:
                raise ConfigError(f"data_path {c.prefix!r} holds {int(c.lengths.sum())} tokens, fewer "
                                  f"than one sample of {sample_tokens} (seq_length + 1)")
        return
    weights = parse_split(split)
    for c in corpora:
        ranges = split_ranges(c.lengths.size, weights)
        for name in needed:
            beg, end = ranges[SPLITS.index(name)]
            tokens = int(c.lengths[beg:end].sum())
            if tokens < sample_tokens:
                raise ConfigError(
                    f"split {split!r} leaves the {name} split of {c.prefix!r} {end - beg} of its "
                    f"{c.lengths.size} documents ({tokens} tokens), fewer than one sample of "
                    f"{sample_tokens} tokens; {_advice(corpora, sample_tokens)}")


def suggest_split(corpora: Sequence[Corpus], sample_tokens: int) -> Optional[str]:
    """A split whose train and valid parts fill a sample in every corpus, validating on the
    fewest last documents that do (train,valid,0: in documents for one corpus, else permille);
    None when no split can."""
    counts = []
    for c in corpora:  # k = the fewest last documents holding one sample
        k = int(np.searchsorted(np.cumsum(c.lengths[::-1]), sample_tokens)) + 1
        if k >= c.lengths.size:
            return None
        counts.append(k)
    if len(corpora) == 1:
        split = f"{corpora[0].lengths.size - counts[0]},{counts[0]},0"
    else:
        valid = max(math.ceil(1000 * (k + 0.5) / c.lengths.size) for k, c in zip(counts, corpora))
        split = f"{1000 - valid},{valid},0"
    weights = parse_split(split)
    fits = all(int(c.lengths[b:e].sum()) >= sample_tokens
               for c in corpora for b, e in split_ranges(c.lengths.size, weights)[:2])
    return split if fits else None


def _advice(corpora: Sequence[Corpus], sample_tokens: int) -> str:
    split = suggest_split(corpora, sample_tokens)
    if split is not None:
        return f"--split {split} would work"
    return ("no split of this data fills both a training and a validation sample: add documents, "
            "lower --seq-length, or give a separate --valid-data-path")


def epochs(corpora: Sequence[Corpus], weights: Optional[Sequence[float]], split: Optional[str],
           num_samples: int, seq_length: int, part: int = 0) -> List[float]:
    """How many times `num_samples` samples of split `part` (0 train, 1 valid) read each corpus's
    part (the whole corpus for `split` None), as Megatron's GPTDataset counts: the tokens it asks
    for, samples x seq_length + 1, over the part's tokens (above 1, it repeats samples). A blend
    asks each corpus for its weight's share plus Megatron's 0.5% surplus
    (BlendedMegatronDatasetBuilder)."""
    if weights is not None and len(corpora) > 1:
        total = sum(weights)
        asked = [math.ceil(math.ceil(num_samples * w / total) * 1.005) for w in weights]
    else:
        asked = [num_samples] * len(corpora)
    return [(n * seq_length + 1) / max(part_tokens(c, split, part), 1) for c, n in zip(corpora, asked)]


def part_tokens(corpus: Corpus, split: Optional[str], part: int) -> int:
    """The tokens of split `part` (0 train, 1 valid) of `corpus` (all of it for `split` None)."""
    beg, end = split_ranges(corpus.lengths.size, parse_split(split))[part] if split else (0, corpus.lengths.size)
    return int(corpus.lengths[beg:end].sum())


def choose_split(corpora: Sequence[Corpus], split: Optional[str], needed: Sequence[str],
                 sample_tokens: int) -> Tuple[str, Optional[str]]:
    """(the split to use, a line saying why when it is not the one asked for). `split` None is
    the default: DEFAULT_SPLIT, or for data too small for it, the split of `suggest_split`."""
    if split is not None:
        check_splits(corpora, split, needed, sample_tokens)
        return split, None
    try:
        check_splits(corpora, DEFAULT_SPLIT, needed, sample_tokens)
        return DEFAULT_SPLIT, None
    except ConfigError as e:
        small = suggest_split(corpora, sample_tokens)
        if small is None or "valid" not in needed:
            raise
        return small, (f"split: the default {DEFAULT_SPLIT} leaves a split without one sample of "
                       f"{sample_tokens} tokens ({str(e).split(' leaves ')[1].split(';')[0]}); using "
                       f"{small} (train,valid,test); pass --split to choose")
