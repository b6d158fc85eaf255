"""TP=2 and TP=2 + sequence parallel match one process (loss and every gradient), in one launch."""

from pathlib import Path

from tests.conftest import torchrun

WORKER = Path(__file__).with_name("parallel_worker.py")


def test_tensor_parallel_with_and_without_sequence_parallel_matches_single_process():
    out = torchrun(WORKER, 2)
    print(out)
    assert "OK 6" in out
    assert out.count("sp=False") == out.count("sp=True") == 6
