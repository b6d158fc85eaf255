"""dataset_check: damaged, empty and too-small indexed datasets are refused in one line."""

import pytest

from spiral_megatron.job.settings.config import ConfigError
from spiral_megatron.job.data.dataset_check import (check_splits, choose_split, open_corpus, parse_split,
                                                    split_ranges)
from spiral_megatron.job.data.preprocess import write_indexed_dataset


class Ids:
    """A stand-in tokenizer: text is a space-separated list of ids."""

    eod, vocab_size, unique_identifiers = 0, 100, {"class": "Ids"}

    def encode(self, text):
        return [int(t) for t in text.split()]


class Vocab:
    """The part of a run's tokenizer `open_corpus` checks ids against."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size


def dataset(tmp_path, docs, name="d"):
    prefix = str(tmp_path / name)
    write_indexed_dataset([" ".join(map(str, d)) for d in docs], Ids(), prefix, quiet=True)
    return prefix


def test_split_ranges_are_megatrons():
    # Megatron: [round(b0 * N), round(b1 * N)) for the normalised bookends
    assert split_ranges(151, parse_split("969,30,1")) == [(0, 146), (146, 151), (151, 151)]
    assert split_ranges(509, parse_split("969,30,1")) == [(0, 493), (493, 508), (508, 509)]
    assert parse_split("99,1") == [0.99, 0.01, 0.0]


@pytest.mark.parametrize("split", ["abc", "1,-1", "", "0,0,0", "1,2,3,4", "nan,1"])
def test_bad_split_strings(split):
    with pytest.raises(ConfigError, match=f"split {split!r} must be up to 3 non-negative numbers"):
        parse_split(split)


def test_split_choice_for_small_data(tmp_path):
    c = [open_corpus(dataset(tmp_path, [[5] * 100, [6] * 100, [7] * 40]), Vocab(10))]
    with pytest.raises(ConfigError, match=r"leaves the valid split of .* 0 of its 3 documents \(0 tokens\), "
                                          r"fewer than one sample of 33 tokens; --split 2,1,0 would work"):
        check_splits(c, "969,30,1", ["train", "valid"], 33)
    assert choose_split(c, None, ["train", "valid"], 33)[0] == "2,1,0"
    assert choose_split(c, None, ["train"], 33) == ("969,30,1", None)  # no evaluation: no valid split
    with pytest.raises(ConfigError, match="no split of this data fills both"):
        choose_split(c, None, ["train", "valid"], 150)


def test_damaged_datasets(tmp_path):
    prefix = dataset(tmp_path, [[1, 2, 3], [4, 5]])
    assert open_corpus(prefix, Vocab(10)).lengths.tolist() == [4, 3]  # eod appended
    with pytest.raises(ConfigError, match=r"token id 5 \(first bad one at token 5\) is beyond the tokenizer's vocabulary of 5"):
        open_corpus(prefix, Vocab(5))
    data = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:-2])
    with pytest.raises(ConfigError, match=r"d.bin' has 12 bytes but its index describes 14 .*truncated"):
        open_corpus(prefix, Vocab(10))
    open(prefix + ".idx", "wb").write(b"not an index at all" * 3)
    with pytest.raises(ConfigError, match=r"d.idx' is not a Megatron indexed dataset index"):
        open_corpus(prefix, Vocab(10))
    with pytest.raises(ConfigError, match=r"missing.bin' does not exist"):
        open_corpus(str(tmp_path / "missing"), Vocab(10))
    empty = dataset(tmp_path, [], "empty")
    with pytest.raises(ConfigError, match="holds no tokens"):
        open_corpus(empty, Vocab(10))


def test_data_of_another_tokenizer_is_refused_by_name(tmp_path):
    from spiral_megatron.job.data.preprocess import preprocess
    from spiral_megatron.job.data.tokenizer import Tokenizer

    texts = tmp_path / "a.txt", tmp_path / "b.txt"
    texts[0].write_text("the quick brown fox jumps over the lazy dog " * 40)
    texts[1].write_text("lorem ipsum dolor sit amet, consectetur adipiscing elit " * 40)
    for name, text in zip("ab", texts):  # two BPEs of the same size, trained on other text
        preprocess([str(text)], str(tmp_path / name), vocab_size=270)
    mine, other = Tokenizer.load(tmp_path / "a_tokenizer"), Tokenizer.load(tmp_path / "b_tokenizer")
    assert mine.vocab_size == other.vocab_size
    assert open_corpus(str(tmp_path / "a"), mine).lengths.size == 1
    with pytest.raises(ConfigError, match=r"data_path '.*b' was made with the tokenizer '.*b_tokenizer' \(270 tokens, "
                                          r"sha256 \w+\), not this run's '.*a_tokenizer' .* pass --tokenizer-model .*b_tokenizer"):
        open_corpus(str(tmp_path / "b"), mine)
    preprocess([str(texts[1])], str(tmp_path / "b"), tokenizer=str(tmp_path / "a_tokenizer"), force=True)
    assert open_corpus(str(tmp_path / "b"), mine).lengths.size == 1  # remade with the run's: accepted


def test_a_tokenizer_of_another_vocabulary_than_the_resolved_one_is_refused():
    """The model's vocabulary is resolved before the embedded corpus's BPE is trained: a BPE that
    cannot have the asked size (a byte-level BPE has at least 257 tokens) is refused by name."""
    from spiral_megatron.job.data import datasets
    from spiral_megatron.job.data.tokenizer import Tokenizer
    from spiral_megatron.job.settings.resolve import resolve
    from tests.conftest import ROOT

    settings = resolve(["--tokenizer-vocab-size", "100"], ROOT / "examples" / "configs" / "debug-cpu.yaml").data
    source = datasets.DataSource(None, None, None, False, None)
    bpe = Tokenizer.train_bpe(["the loop runs coarse to fine"], 100)
    with pytest.raises(ConfigError, match="tokenizer_vocab_size 100: the tokenizer 'None' has 257 tokens"):
        datasets.check(settings, source, bpe)
    datasets.check(settings, source, Vocab(100))  # mock data: nothing to read, the size agrees


def test_a_data_path_that_is_no_dataset_prefix_says_what_to_pass(tmp_path):
    """A text file, a prefix with its .bin, a folder of datasets, an empty folder: each named
    with what to pass instead (the commands it shows work as written: tests/integration/test_preprocess.py)."""
    from spiral_megatron.job.data.dataset_check import not_a_dataset

    (tmp_path / "d.bin").write_bytes(b"")
    (tmp_path / "d.idx").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("text\n")
    (tmp_path / "empty").mkdir()
    d, notes = str(tmp_path / "d"), str(tmp_path / "notes.txt")
    assert not_a_dataset("data_path", d) is None
    assert not_a_dataset("data_path", d + ".bin") == f"data_path '{d}.bin': pass the dataset's prefix, without .bin: '{d}'"
    assert not_a_dataset("train_data_path", notes) == (
        f"train_data_path '{notes}' is a text file, not a Megatron dataset (PREFIX.bin + PREFIX.idx): make one with "
        f"`python tools/preprocess_data.py --input {notes} --output-prefix data/notes`, then pass --train-data-path "
        "data/notes")
    assert not_a_dataset("data_path", str(tmp_path)) == (f"data_path '{tmp_path}' is a folder: pass a dataset prefix "
                                                         f"in it ({d}), or a blend")
    assert "is a folder holding no Megatron dataset" in not_a_dataset("data_path", str(tmp_path / "empty"))
    assert not_a_dataset("data_path", d + "x") == f"data_path: '{d}x.bin' does not exist (make it with tools/preprocess_data.py)"


@pytest.mark.parametrize("train_samples", [3, 40, 400])
def test_epochs_are_megatrons(tmp_path, train_samples):
    """The job's count of how often a run reads its train split, against the epochs of the
    document index Megatron's GPTDataset builds for that run (its whole number of epochs)."""
    import math

    from spiral_megatron.job.data import datasets
    from spiral_megatron.job.data.data_settings import DataSettings
    from spiral_megatron.job.data.dataset_check import epochs

    prefix = dataset(tmp_path, [[5 + i % 7] * (20 + 9 * i) for i in range(10)])
    settings = DataSettings(data_path=(prefix,), train_data_path=None, valid_data_path=None, mock_data=False,
                            split="8,2,0", tokenizer=None, vocab_size=100, cache_dir=str(tmp_path / "cache"),
                            seq_length=16, eod_mask_loss=False, mmap_bin_files=True, seed=1, valid_seed=2,
                            evaluate=False, train_samples=train_samples, valid_samples=1)
    source = datasets.DataSource(train=([prefix], None), valid=([prefix], None), split="8,2,0", whole=False,
                                 tokenizer_path=None)
    built = datasets._build(settings, source, Ids(), "8,2,0", 0, train_samples, 1)
    megatron_epochs = len(built.document_index) // len(built.indices)
    (times,) = epochs([open_corpus(prefix, Vocab(100))], None, "8,2,0", train_samples, 16)
    assert math.ceil(times) == megatron_epochs and (times > 1) == (megatron_epochs > 1)
