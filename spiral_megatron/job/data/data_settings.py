"""DataSettings: what data the job reads and how much of it, as job/settings/resolve.py resolved it.

job/data/ sits below job/settings/ (docs/ARCHITECTURE.md): settings read the tokenizer's
vocabulary from here, and the data modules read only this, never the job's keys.
"""

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class DataSettings:
    """The data of one job; None paths and `mock_data` false mean the embedded corpus."""

    data_path: Optional[Tuple[str, ...]]
    """Indexed dataset prefixes, optionally weighted, divided by `split` (Megatron-LM's --data-path)."""

    train_data_path: Optional[Tuple[str, ...]]
    """Training data used whole (Megatron-LM's --train-data-path)."""

    valid_data_path: Optional[Tuple[str, ...]]
    """Validation data used whole (Megatron-LM's --valid-data-path)."""

    mock_data: bool
    """Megatron's MockGPTDataset (random tokens) instead of text."""

    split: Optional[str]
    """Train/valid/test split of data_path's documents; None = dataset_check's default."""

    tokenizer: Optional[str]
    """The tokenizer's folder or tokenizer.json; None = the embedded corpus's (or none for mock data)."""

    vocab_size: int
    """The tokenizer's vocabulary (unpadded): read from `tokenizer`, else the embedded corpus's BPE
    size, else mock data's."""

    cache_dir: Optional[str]
    """Where the embedded corpus and dataset indices are cached; None = default_data.cache_root's."""

    seq_length: int
    """Tokens per sample."""

    eod_mask_loss: bool
    """Predictions made from an end-of-document token are left out of the loss (Megatron-LM's)."""

    mmap_bin_files: bool
    """The .bin files are read through a memory map (else with file reads)."""

    seed: int
    """Order of the training samples."""

    valid_seed: int
    """Order of the validation samples."""

    evaluate: bool
    """The job evaluates: a validation split is needed."""

    train_samples: int
    """Samples the training run draws from: train_samples, else train_iters x global batch (Megatron-LM's)."""

    valid_samples: int
    """Samples one evaluation consumes (eval_iters x global batch, at least 1)."""

    def needed(self) -> Tuple[str, ...]:
        """The splits the job reads."""
        return ("train", "valid") if self.evaluate else ("train",)
