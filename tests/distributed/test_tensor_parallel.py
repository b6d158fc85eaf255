"""TP=2, TP=2 + sequence parallel, and TP=2 + SP with SDPAttention match one process with
Megatron's attention (loss and every gradient), in one launch."""

from pathlib import Path

from tests.conftest import torchrun

WORKER = Path(__file__).with_name("parallel_worker.py")


def test_tensor_parallel_layouts_match_single_process():
    out = torchrun(WORKER, 2)
    print(out)
    assert "OK 8" in out
    for layout in ("sp=False unfused", "sp=True unfused", "sp=True flash"):
        assert out.count(layout) == 8, layout
