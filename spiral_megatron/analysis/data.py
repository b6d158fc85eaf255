"""Fixed evaluation sequences: documents from an indexed dataset or text/JSONL files.

Documents are tokenized with the model's tokenizer, joined with its end-of-document id (as
Megatron's GPTDataset does) and cut into consecutive, non-overlapping windows of
`seq_length + 1` tokens: inputs are the first `seq_length`, labels the last `seq_length`.
No seed, no shuffling: the same files give the same sequences for every run and variant.
"""

from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch


def is_indexed_prefix(path: str) -> bool:
    """True when `path.bin` and `path.idx` exist (a Megatron indexed dataset prefix)."""
    return Path(str(path) + ".bin").is_file() and Path(str(path) + ".idx").is_file()


def token_documents(paths: Sequence[str], tokenizer=None, text_key: str = "text") -> Iterator[np.ndarray]:
    """Token ids per document, in order. Indexed prefixes are read as they are (their
    documents already end with the end-of-document id); text/JSONL files need `tokenizer`
    (spiral_megatron.job.data.tokenizer.Tokenizer) and get its eod id appended."""
    from spiral_megatron.job.data.preprocess import input_files, read_documents, read_indexed_dataset

    for path in paths:
        if is_indexed_prefix(path):
            yield from (np.asarray(doc, dtype=np.int64) for doc in read_indexed_dataset(str(path)))
            continue
        try:
            files = input_files([path])  # a file, a folder's files, a quoted pattern's
        except FileNotFoundError:
            raise FileNotFoundError(f"{path!r} is neither a file, a folder or pattern of files, nor an indexed "
                                    "dataset prefix (.bin/.idx)") from None
        if tokenizer is None:
            raise ValueError(f"{path}: text and JSONL files need a tokenizer")
        for text in read_documents(files, text_key):
            yield np.asarray(tokenizer.encode(text) + [tokenizer.eod], dtype=np.int64)


def sequences(documents: Iterator[np.ndarray], seq_length: int, max_sequences: Optional[int] = None) -> torch.Tensor:
    """[n, seq_length + 1] consecutive windows of the joined documents (the tail is dropped)."""
    if seq_length < 1:
        raise ValueError(f"seq_length {seq_length} must be >= 1")
    width, buffer, rows = seq_length + 1, [], []
    held = 0
    for doc in documents:
        buffer.append(doc)
        held += len(doc)
        while held >= width and (max_sequences is None or len(rows) < max_sequences):
            flat = np.concatenate(buffer)
            rows.append(flat[:width])
            buffer, held = [flat[width:]], len(flat) - width
        if max_sequences is not None and len(rows) >= max_sequences:
            break
    if not rows:
        raise ValueError(f"the documents hold fewer than seq_length + 1 = {width} tokens")
    return torch.from_numpy(np.stack(rows))  # [n, seq_length + 1]


def batches(rows: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    """`rows` split into batches of at most `batch_size` rows."""
    return list(torch.split(rows, batch_size))
