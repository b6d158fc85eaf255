"""The embedded default data: the stdlib-docstring corpus, its BPE and indexed dataset, cached.

Built once per (Python version, vocabulary size) into `<cache>/corpus-py<X.Y>-v<vocab>/`:
`tokenizer/` and `text_document.bin/.idx`. The folder is assembled under a temporary name and
renamed into place, so concurrent first uses never see half a folder.
"""

import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Tuple

from spiral_megatron.job.data import corpus
from spiral_megatron.job.data.preprocess import write_indexed_dataset
from spiral_megatron.job.data.tokenizer import Tokenizer

PREFIX_NAME = "text_document"


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """`cache_dir`, else $SPIRAL_CACHE, else ~/.cache/spiral_megatron."""
    return Path(cache_dir or os.environ.get("SPIRAL_CACHE") or Path.home() / ".cache" / "spiral_megatron")


def folder(cache_dir: Optional[str], vocab_size: int) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return cache_root(cache_dir) / f"corpus-py{version}-v{vocab_size}"


def paths(cache_dir: Optional[str], vocab_size: int) -> Tuple[str, Path]:
    """(dataset prefix, tokenizer folder) of the cached default data."""
    base = folder(cache_dir, vocab_size)
    return str(base / PREFIX_NAME), base / "tokenizer"


def ensure(cache_dir: Optional[str], vocab_size: int) -> Tuple[str, Path]:
    """Build the default data if missing; returns paths(). Call on one rank, then barrier."""
    base = folder(cache_dir, vocab_size)
    if not (base / "tokenizer" / "tokenizer.json").is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        tmp = base.with_name(f"{base.name}.tmp{os.getpid()}")
        docs = corpus.documents()
        print(f"building the default corpus ({len(docs)} documents of CPython's docstrings) in {base}")
        tok = Tokenizer.train_bpe(docs, vocab_size)
        write_indexed_dataset(docs, tok, str(tmp / PREFIX_NAME), tokenizer_name=str(base / "tokenizer"))
        tok.save(tmp / "tokenizer")  # saved last: its presence marks a complete folder
        try:
            os.rename(tmp, base)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return paths(cache_dir, vocab_size)
