"""Data: the embedded corpus round-trips through its BPE; the tool writes Megatron's format."""

import json
import subprocess
import sys

import numpy
import pytest

from spiral_megatron.job.data import corpus
from spiral_megatron.job.data import default_data
from spiral_megatron.job.data.preprocess import read_indexed_dataset
from spiral_megatron.job.data.tokenizer import Tokenizer
from tests.integration.conftest import ROOT, environment


def test_default_corpus_round_trips(cache_dir):
    prefix, tokenizer_dir = default_data.ensure(str(cache_dir), 512)
    tok = Tokenizer.load(tokenizer_dir)
    docs = corpus.documents()
    assert len(docs) > 100 and sum(map(len, docs)) > 500_000  # a real corpus, not a toy
    assert tok.vocab_size == 512 and tok.decode([tok.eod]) == "<|endoftext|>"
    stored = read_indexed_dataset(prefix)
    assert len(stored) == len(docs)
    for doc, ids in zip(docs, stored):
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1].tolist()) == doc  # decode(encode(text)) == text, via the .bin


def test_tool_trains_a_tokenizer_and_writes_indexed_dataset(tmp_path, cache_dir):
    texts = ["Hello, world!\nSecond line.", "ünïcödé — and emoji 🙂 survive byte-level BPE", "x" * 50]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"content": t}) for t in texts[:2]) + "\n")
    (tmp_path / "b.txt").write_text(texts[2])
    prefix = tmp_path / "out" / "text"
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", tmp_path / "a.jsonl",
           tmp_path / "b.txt", "--output-prefix", prefix, "--json-keys", "content", "--vocab-size", 300]
    env = {k: v for k, v in environment(cache_dir).items() if k != "PYTHONWARNINGS"}  # as a user runs it
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout
    # Megatron's import warnings (Apex/TE missing) are counted in one line, not shown (issue 17's rule)
    assert "Warning" not in proc.stderr and "known-harmless Megatron-Core/torch warning" in proc.stderr, proc.stderr
    tok = Tokenizer.load(f"{prefix}_tokenizer")
    stored = read_indexed_dataset(str(prefix))
    assert [tok.decode(ids[:-1].tolist()) for ids in stored] == texts
    assert all(ids[-1] == tok.eod for ids in stored) and stored[0].dtype == numpy.uint16

    missing = subprocess.run(list(map(str, cmd[:3] + [tmp_path / "nope.jsonl"] + cmd[5:])),
                             capture_output=True, text=True, env=environment(cache_dir))
    assert missing.returncode == 2 and "nope.jsonl' does not exist" in missing.stderr


def test_a_record_without_the_text_key_is_named_with_its_keys(tmp_path):
    from spiral_megatron.job.data.preprocess import read_documents

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.pop(0)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"content": "x", "id": 2}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:2: no text under key 'text' \(the record holds: content, id; --json-keys KEY names the key\)"):
        list(read_documents([tmp_path / "a.jsonl"]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl:2: 'text' holds null, not text \(a string\)$"):
        list(read_documents([tmp_path / "b.jsonl"]))
    # Megatron-LM's --json-keys, and --json-key, name the key; one key per run
    base = ["--input", "a.jsonl", "--output-prefix", "p"]
    assert preprocess_data.parse_args(base + ["--json-keys", "content"]).json_key == "content"
    assert preprocess_data.parse_args(base + ["--json-key", "content"]).json_key == "content"
    assert preprocess_data.parse_args(base).json_key == "text"
    with pytest.raises(SystemExit):
        preprocess_data.parse_args(base + ["--json-keys", "content", "id"])


def test_workers_write_the_bytes_one_process_writes(tmp_path):
    """--workers N (Megatron-LM's): N spawned processes tokenize, in order; the dataset is the
    one a single process writes, byte for byte. Megatron-LM's --append-eod and --tokenizer-type
    HuggingFaceTokenizer are taken (what the tool always does); another type is refused."""
    from spiral_megatron.job.data.preprocess import preprocess

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.pop(0)
    texts = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(i % 40)) for i in range(300)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([str(tmp_path / "d.jsonl")], str(tmp_path / "one"), vocab_size=300)
    for n, prefix in ((1, "again"), (3, "three")):
        preprocess([str(tmp_path / "d.jsonl")], str(tmp_path / prefix), tokenizer=str(tmp_path / "one_tokenizer"),
                   workers=n)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"three{ext}").read_bytes() == (tmp_path / f"again{ext}").read_bytes()
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "one.bin").read_bytes()
    base = ["--input", "a.jsonl", "--output-prefix", "p"]
    args = preprocess_data.parse_args(base + ["--append-eod", "--tokenizer-type", "HuggingFaceTokenizer",
                                              "--workers", "4"])
    assert args.workers == 4
    for bad in (["--tokenizer-type", "GPT2BPETokenizer"], ["--workers", "0"]):
        with pytest.raises(SystemExit):
            preprocess_data.parse_args(base + bad)


def test_a_folder_or_a_quoted_pattern_is_its_files_and_a_binary_file_is_named(tmp_path):
    """A folder is every file under it (hidden ones skipped), a pattern the files it matches,
    both sorted: the same bytes as the files named one by one."""
    from spiral_megatron.job.data.preprocess import input_files, preprocess

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / ".hidden").mkdir()
    for name, text in (("b.py", "def b(): pass\n"), ("a.txt", "alpha beta\n"), ("sub/c.py", "import os\n"),
                       (".hidden/d.py", "secret\n"), (".e.py", "hidden too\n")):
        (src / name).write_text(text)
    assert input_files([src]) == [src / "a.txt", src / "b.py", src / "sub" / "c.py"]
    assert input_files([f"{src}/**/*.py"]) == [src / "b.py", src / "sub" / "c.py"]
    named = [str(src / "a.txt"), str(src / "b.py"), str(src / "sub" / "c.py")]
    tok = preprocess(named, str(tmp_path / "named"), vocab_size=300)
    preprocess([str(src)], str(tmp_path / "folder"), tokenizer=str(tmp_path / "named_tokenizer"))
    assert tok.vocab_size <= 300
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"folder{suffix}").read_bytes() == (tmp_path / f"named{suffix}").read_bytes()
    for bad, message in ((f"{src}/*.rs", "matches no file"), (str(tmp_path / "none"), "does not exist")):
        with pytest.raises(FileNotFoundError, match=message):
            input_files([bad])
    (src / "sub" / "x.pyc").write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(ValueError, match=r"x.pyc' is not UTF-8 text \(byte 1\)"):
        preprocess([str(src)], str(tmp_path / "binary"), vocab_size=300)


def test_eod_mask_loss_and_file_reads_as_megatron_lm(tmp_path, cache_dir):
    """--eod-mask-loss leaves out of the loss exactly the positions whose input token is the
    end-of-document token (Megatron-LM's GPTDataset rule, computed here from the tokens); without
    it every position counts. --no-mmap-bin-files reads the same samples with file reads."""
    from spiral_megatron.job.data import datasets as data
    from spiral_megatron.job.data.preprocess import preprocess
    from spiral_megatron.job.settings.resolve import resolve

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"document {i}: " + "word " * (i % 7)}) for i in range(60)) + "\n")
    prefix = str(tmp_path / "docs")
    preprocess([str(docs)], prefix, vocab_size=300)

    def samples(*flags):
        job = resolve(["--data-path", prefix, "--seq-length", "16", "--train-iters", "2", "--eval-interval", "none",
                       "--cache-dir", str(cache_dir), *flags], ROOT / "examples" / "configs" / "debug-cpu.yaml")
        source = data.resolve(job.data, build_default=False)
        tokenizer = data.load_tokenizer(source, job.data.vocab_size)
        train, _ = data.build_datasets(job.data, source, tokenizer, data.check(job.data, source, tokenizer))
        return tokenizer, [train[i] for i in range(12)]

    tokenizer, masked = samples("--eod-mask-loss")
    _, plain = samples()
    _, read = samples("--eod-mask-loss", "--no-mmap-bin-files")
    assert sum(int((s["tokens"] == tokenizer.eod).sum()) for s in masked) > 10  # documents end inside samples
    for m, p, r in zip(masked, plain, read):
        assert numpy.array_equal(m["tokens"], p["tokens"]) and numpy.array_equal(m["tokens"], r["tokens"])
        assert numpy.array_equal(numpy.asarray(m["loss_mask"]), (numpy.asarray(m["tokens"]) != tokenizer.eod).astype(numpy.float32))
        assert numpy.asarray(p["loss_mask"]).min() == 1.0
        assert numpy.array_equal(numpy.asarray(r["loss_mask"]), numpy.asarray(m["loss_mask"]))


def test_data_made_with_a_tokenizer_elsewhere_finds_it_through_its_record(tmp_path, monkeypatch):
    """Data made with --tokenizer-model DIR has no tokenizer beside it: the job takes the one its
    .meta.json names when that folder is there, and otherwise names it in the refusal."""
    from spiral_megatron.errors import ConfigError
    from spiral_megatron.job.data import datasets as data
    from spiral_megatron.job.data.preprocess import preprocess
    from spiral_megatron.job.settings.resolve import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("alpha beta gamma delta " * 20)
    preprocess([str(tmp_path / "a.txt")], "first/a", vocab_size=300)  # trains first/a_tokenizer
    preprocess([str(tmp_path / "a.txt")], "second/b", tokenizer="first/a_tokenizer")
    job = resolve(["--data-path", "second/b", "--train-iters", "2"], ROOT / "examples" / "configs" / "debug-cpu.yaml")
    assert job.keys.tokenizer == "first/a_tokenizer" and job.keys.tokenizer_vocab_size > 256
    (tmp_path / "first").rename(tmp_path / "moved")
    job = resolve(["--data-path", "second/b", "--train-iters", "2"], ROOT / "examples" / "configs" / "debug-cpu.yaml")
    with pytest.raises(ConfigError, match="second/b.meta.json says it was made with 'first/a_tokenizer', not found"):
        data.resolve(job.data, build_default=False)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The disk fills while the dataset is written: one line naming the output, the cause and the
    space left, exit 1, and no temporary file left filling the disk. Before: a traceback, and the
    partial .bin stayed (its cleanup closed the file first, whose flush failed again). An input
    that cannot be read is still named as the input (exit 2)."""
    import errno

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.pop(0)
    (tmp_path / "a.txt").write_text("some text to tokenize " * 50)
    tokenizer = tmp_path / "tok"
    Tokenizer.train_bpe(["some text to tokenize " * 50], vocab_size=300).save(tokenizer)
    writes = []

    def full(self, *args, **kwargs):
        writes.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", full)
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "a.txt"), "--output-prefix", str(out / "d"), "--tokenizer-model", str(tokenizer)]
    assert preprocess_data.main(argv) == 1 and writes
    err = capsys.readouterr().err
    assert err.startswith(f"preprocess_data: error: writing {out / 'd'}.bin/.idx failed (OSError: [Errno 28] No space "
                          "left on device); ") and err.count("\n") == 1, err
    assert "MiB free on its file system; nothing of it was kept" in err and list(out.iterdir()) == [], err
    monkeypatch.undo()
    assert preprocess_data.main([*argv[:1], str(tmp_path / "missing.txt"), *argv[2:]]) == 2


def test_the_summary_goes_to_the_stdout_of_the_call(tmp_path, monkeypatch):
    """The progress line is written to sys.stdout as it is when the tool runs (a notebook, a
    test, a caller that redirects it), not to the stream of when the module was imported."""
    import io

    from spiral_megatron.job.data import preprocess
    from spiral_megatron.job.data.tokenizer import Tokenizer

    (tmp_path / "a.txt").write_text("one document of text " * 20)
    tokenizer = Tokenizer.train_bpe(list(preprocess.read_documents([tmp_path / "a.txt"])), vocab_size=300)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    preprocess.write_indexed_dataset(preprocess.read_documents([tmp_path / "a.txt"]), tokenizer, str(tmp_path / "p"))
    assert "1 documents, " in out.getvalue()
