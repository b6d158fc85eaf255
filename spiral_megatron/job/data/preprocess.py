"""Text -> Megatron indexed dataset (`PREFIX.bin` / `PREFIX.idx`), with Megatron's builder.

Inputs are JSONL files (one document per line, text under `text_key`) or plain text files
(one document per file). Each document is tokenized and ends with the end-of-document token,
as Megatron's `tools/preprocess_data.py --append-eod` does. Beside the two files,
`PREFIX.meta.json` records which tokenizer made the data (its name and content digest, the one
the resume checks compare), so a run with another tokenizer is refused (dataset_check.py).

Existing outputs are kept unless `force`; everything is written under temporary names and
renamed into place at the end, and the temporary files are removed on any error. `workers`
processes tokenize (Megatron-LM's `--workers`), in the documents' order: the output does not
depend on their number.
"""

import contextlib
import errno
import json
import multiprocessing
import os
import glob
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy

from spiral_megatron.errors import SaveFailed, space_left
from spiral_megatron.job.data.tokenizer import Tokenizer


def input_files(inputs: Sequence[str]) -> List[Path]:
    """The files `inputs` name, in order: a file, itself; a folder, every file under it (sorted,
    hidden ones skipped); a pattern with * ? or [ that the shell left alone (quoted), the files it
    matches (sorted; ** goes into subfolders). Anything else is a FileNotFoundError naming it."""
    files: List[Path] = []
    for name in map(str, inputs):
        path = Path(name)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif any(c in name for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(name, recursive=True) if Path(p).is_file())
        else:
            raise FileNotFoundError(f"input {name!r} does not exist")
        if not found:
            raise FileNotFoundError(f"input {name!r} {'holds' if path.is_dir() else 'matches'} no file")
        files += found
    return files


def read_documents(paths: Sequence[Path], text_key: str = "text") -> Iterator[str]:
    """Documents of JSONL (`*.jsonl`, `*.json`) and plain text files, in the given order; a
    file that is not UTF-8 text is a ValueError naming it."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"input {str(path)!r} does not exist")
        try:
            yield from _documents(path, text_key)
        except UnicodeDecodeError as e:
            raise ValueError(f"input {str(path)!r} is not UTF-8 text (byte {e.start}): pass text or JSONL files "
                             "(a quoted pattern such as 'src/**/*.py' picks them out of a folder)") from None


def _documents(path: Path, text_key: str) -> Iterator[str]:
    """The documents of one file (see read_documents)."""
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                    text = record.get(text_key) if isinstance(record, dict) else None
                    if isinstance(record, dict) and text_key in record and not isinstance(text, str):
                        raise ValueError(f"{path}:{n}: {text_key!r} holds {json.dumps(text)[:40]}, not text (a string)")
                    if not isinstance(text, str):
                        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                        raise ValueError(f"{path}:{n}: no text under key {text_key!r} (the record holds: {keys}; "
                                         "--json-keys KEY names the key)")
                    yield text
    else:
        yield path.read_text(encoding="utf-8")


def token_dtype(vocab_size: int):
    """uint16 when every id fits (as Megatron's DType.optimal_dtype), else int32."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


class _Progress:
    """A one-line progress display on a terminal; a summary line otherwise."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdout  # today's stdout, not the one at import
        self.start, self.docs, self.tokens = time.time(), 0, 0
        self.tty = self.stream.isatty()

    def update(self, tokens: int) -> None:
        self.docs, self.tokens = self.docs + 1, self.tokens + tokens
        if self.tty and self.docs % 100 == 0:
            self.stream.write(f"\r{self.line()}")
            self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        return (f"{self.docs} documents, {self.tokens} tokens, {elapsed:.1f} s, "
                f"{self.tokens / elapsed:,.0f} tokens/s")

    def close(self) -> None:
        self.stream.write(("\r" if self.tty else "") + self.line() + "\n")


def meta_path(prefix: str) -> Path:
    """Where `write_indexed_dataset` records the tokenizer that made `prefix`."""
    return Path(f"{prefix}.meta.json")


def recorded_tokenizer(prefix: str) -> Optional[str]:
    """The tokenizer PREFIX.meta.json names (as tools/preprocess_data.py was given it), or None."""
    path = meta_path(prefix)
    return json.loads(path.read_text()).get("tokenizer") if path.is_file() else None


_worker_tokenizer = None  # a tokenizing worker's own (`_start_worker`)


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    _worker_tokenizer = HFTokenizer.from_str(tokenizer_json)


def _encode_in_worker(text: str) -> List[int]:
    return _worker_tokenizer.encode(text, add_special_tokens=False).ids  # as Tokenizer.encode


def encoded(documents: Iterable[str], tokenizer: Tokenizer, workers: int = 1) -> Iterator[List[int]]:
    """The token ids of each document, in order; `workers` > 1 processes tokenize (spawned, each
    with its own copy of the tokenizer, as Megatron-LM's tools/preprocess_data.py does)."""
    if workers <= 1:
        yield from map(tokenizer.encode, documents)
        return
    context = multiprocessing.get_context("spawn")  # a fork after the BPE's threads ran can deadlock
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer.hf.to_str(),)) as pool:
        yield from pool.imap(_encode_in_worker, documents, chunksize=16)


def write_indexed_dataset(documents: Iterable[str], tokenizer: Tokenizer, output_prefix: str,
                          append_eod: bool = True, quiet: bool = False, tokenizer_name: Optional[str] = None,
                          workers: int = 1) -> int:
    """Tokenize `documents` into `output_prefix`.bin/.idx atomically (with `workers` processes);
    returns the token count. A tokenizer with a content digest is recorded in PREFIX.meta.json,
    under `tokenizer_name` (default: the folder it was loaded from)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = None
    try:
        builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=token_dtype(tokenizer.vocab_size))
        progress = _Progress()
        for ids in encoded(documents, tokenizer, workers):
            ids = ids + ([tokenizer.eod] if append_eod else [])
            if ids:
                builder.add_document(ids, [len(ids)])
                progress.update(len(ids))
        builder.finalize(f"{tmp}.idx")
        _write_meta(meta_path(tmp), tokenizer, tokenizer_name)
        meta_path(prefix).unlink(missing_ok=True)  # never left describing data it did not make
        for ext in (".bin", ".idx", ".meta.json"):
            if Path(tmp + ext).exists():
                os.replace(tmp + ext, prefix + ext)
    except BaseException as e:
        left = space_left(Path(prefix).parent)  # before the partial files are deleted
        if builder is not None:  # closed first: with multi-storage-client installed, megatron-core 0.16
            with contextlib.suppress(OSError):  # writes through msc.open, which creates the file only on close
                builder.data_file.close()  # (a full disk fails this flush too)
        for ext in (".bin", ".idx", ".meta.json"):
            Path(tmp + ext).unlink(missing_ok=True)
        if _write_error(e, tmp):  # a full disk, a broken mount (not an input that cannot be read)
            raise SaveFailed(f"writing {prefix}.bin/.idx failed ({type(e).__name__}: {e}); {left}; "
                             "nothing of it was kept") from e
        raise
    if not quiet:
        progress.close()
    return progress.tokens


def _write_error(e: BaseException, tmp: str) -> bool:
    """Whether `e` failed writing the output (files starting with `tmp`), not reading an input."""
    return isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
                                       or str(e.filename or "").startswith(tmp))


def _write_meta(path: Path, tokenizer, name: Optional[str]) -> None:
    """The tokenizer's name and content digest (`Tokenizer.unique_identifiers`); nothing for a
    tokenizer without a digest (test stand-ins)."""
    digest = getattr(tokenizer, "unique_identifiers", {}).get("sha256")
    if digest:
        record = {"tokenizer": name or getattr(tokenizer, "path", None), "tokenizer_sha256": digest,
                  "tokenizer_vocab_size": tokenizer.vocab_size}
        path.write_text(json.dumps(record, indent=2) + "\n")


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer: Optional[str] = None,
               vocab_size: int = 512, text_key: str = "text", save_tokenizer: Optional[str] = None,
               force: bool = False, workers: int = 1) -> Tokenizer:
    """The tool's work: load (or train a BPE on the inputs) a tokenizer, then write the dataset.

    A trained tokenizer is saved to `save_tokenizer` (default: `<output_prefix>_tokenizer/`),
    renamed into place after the dataset is complete. Existing outputs are refused unless `force`.
    """
    named = list(map(str, inputs))
    inputs = input_files(named)  # a missing input first: it matters more than existing outputs
    if len(inputs) != len(named):
        print(f"input: {len(inputs)} files from {', '.join(named)}", flush=True)
    folder = None if tokenizer is not None else Path(save_tokenizer or f"{output_prefix}_tokenizer")
    outputs = [Path(f"{output_prefix}.bin"), Path(f"{output_prefix}.idx")] + ([folder] if folder else [])
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass --force to overwrite")
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
        count = write_indexed_dataset(read_documents(inputs, text_key), tok, output_prefix, tokenizer_name=tokenizer,
                                      workers=workers)
    else:
        tok = Tokenizer.train_bpe(read_documents(inputs, text_key), vocab_size)
        staging = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        try:
            tok.save(staging)
            count = write_indexed_dataset(read_documents(inputs, text_key), tok, output_prefix,
                                          tokenizer_name=str(folder), workers=workers)
            _replace_folder(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"trained a byte-level BPE of {tok.vocab_size} tokens, saved to {folder}")
    print(f"wrote {output_prefix}.bin/.idx: {count} tokens")
    return tok


def _replace_folder(new: Path, dest: Path) -> None:
    """Rename `new` to `dest`; an existing `dest` is renamed aside first and deleted last."""
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def read_indexed_dataset(prefix: str) -> List[numpy.ndarray]:
    """Every document of an indexed dataset (for checks and tests)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [numpy.array(ds[i]) for i in range(len(ds))]  # copies: the mmap closes with ds
