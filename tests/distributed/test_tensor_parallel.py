"""TP=2 and TP=2 + sequence parallel match one process (loss and every gradient); so does
TP=2 + SP with SDPAttention against one process with Megatron's unfused attention."""

from pathlib import Path

import pytest

from tests.conftest import torchrun

WORKER = Path(__file__).with_name("parallel_worker.py")


@pytest.mark.parametrize("flags", [[], ["--sequence-parallel"], ["--sequence-parallel", "--attention-backend", "flash"]],
                         ids=["tp2", "tp2-sp", "tp2-sp-sdpa"])
def test_tensor_parallel_matches_single_process(flags):
    out = torchrun(WORKER, 2, *flags)
    print(out)
    assert "OK 7" in out
