"""The job's gradient norm (parallel/grad_norm.py, issue 23): Megatron's value and clipping, in
one fused reduction, with no host read and without Megatron's per-tensor fallback
(`local_multi_tensor_l2_norm`, one host sync per gradient tensor without apex/TE). The
reference is Megatron's own `get_grad_norm_fp32` and `clip_grad_by_total_norm_fp32` on the same
gradients; tests/distributed/test_layouts.py compares the two norms at TP, PP and DP layouts,
where they reduce over the model-parallel group or the whole world."""

import collections
import sys
from unittest import mock

import pytest
import torch
from megatron.core.optimizer import clip_grads

from spiral_megatron.job.build import build
from spiral_megatron.job.settings.resolve import resolve
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from host_syncs import counting  # noqa: E402

DEBUG = ROOT / "examples" / "configs" / "debug-cpu.yaml"
SEQ = 32


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def job(megatron, request):
    """The job's model and optimizer (the debug flavor) after one backward, main grads ready."""
    job = resolve(["--precision", request.param, "--seq-length", str(SEQ), "--micro-batch-size", "2",
                   "--global-batch-size", "2", "--mock-data", "true"], DEBUG, on_cpu=True)
    parts = build(job)
    vocab = job.keys.tokenizer_vocab_size
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))
    parts.optimizer.zero_grad()
    parts.model(tokens, torch.arange(SEQ).expand(2, SEQ), None, labels=tokens).float().mean().backward()
    parts.model.finish_grad_sync()
    assert not parts.optimizer.prepare_grads()  # main grads (fp32) from the model's
    return parts.optimizer


def main_grads(optimizer):
    return [p.grad for p in optimizer.get_parameters() if p.grad is not None]


def test_norm_is_megatrons_in_one_reduction_without_host_reads(job):
    want = job.chained_optimizers[0].get_grad_norm()  # Megatron's, through its per-tensor fallback
    reads = collections.Counter()
    with mock.patch.object(clip_grads, "l2_norm_impl", side_effect=AssertionError("per-tensor fallback")), \
            mock.patch.object(torch.distributed, "all_reduce", wraps=torch.distributed.all_reduce) as reduce, \
            counting(reads):
        norm = job.get_grad_norm()
    assert not reads, f"host reads of tensor values: {dict(reads)}"
    assert reduce.call_count == 1  # the grad-stats group's all-reduce (model-parallel or world)
    assert norm.shape == () and norm.dtype == torch.float32
    assert norm.item() == pytest.approx(want, rel=1e-6)  # fp32 rounding: Megatron takes the root in float64


@pytest.mark.parametrize("clip", [1e-3, 1e6], ids=["clipped", "not-clipped"])
def test_clipping_is_megatrons(job, clip):
    before = [g.clone() for g in main_grads(job)]
    norm = job.get_grad_norm()
    clip_grads.clip_grad_by_total_norm_fp32(job.get_parameters(), clip, norm.item())  # Megatron's
    want = [g.clone() for g in main_grads(job)]
    for g, b in zip(main_grads(job), before):
        g.copy_(b)
    with mock.patch.object(job.config, "clip_grad", clip):
        job.clip_grads(norm)
    for got, ref, b in zip(main_grads(job), want, before):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
        g_equal = torch.equal(got, b)
        assert g_equal == (clip == 1e6)  # unchanged exactly when the coefficient is not below 1
    for g, b in zip(main_grads(job), before):
        g.copy_(b)
