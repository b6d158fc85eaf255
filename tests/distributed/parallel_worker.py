"""Run under torchrun with 2 ranks, in one launch: TP=2, TP=2 with sequence parallelism, and TP=2
with sequence parallelism and SDPAttention (attention_backend flash), each vs one process with
Megatron's attention.

For each tiny config: build it at TP=1 (every rank, the single-process reference) and at
TP=2 from the same seed (CPU initialisation gives identical full weights), run forward and
backward on the same batch, gather TP-split gradients to full tensors, sum the gradients of
sequence-parallel replicated parameters and of the query/key norms over TP (what Megatron's
finalize_model_grads does),
and compare loss and every gradient. Prints one line per case and layout; rank 0 prints
"OK <n>" (n cases, each at every layout).
"""

import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnBackend

from spiral_megatron import parallel
from tests.tiny import VOCAB, tiny_model

LAYOUTS = [(False, AttnBackend.unfused), (True, AttnBackend.unfused), (True, AttnBackend.flash)]  # (SP, attention)

SEQ, BATCH = 32, 2
CASES = {
    "residual-8421": dict(topology="residual"),
    "anchor-mean-repeat-offsets": dict(topology="anchor", downscale="mean", upscale="repeat", chunk_offsets=(3, 1, 1, 0)),
    "mesh-no-overlap-offsets": dict(topology="mesh", shift="no-overlap", chunk_offsets=(7, 2, 0, 0)),
    "mesh-16-8-4-2-1": dict(topology="mesh", chunk_sizes=(16, 8, 4, 2, 1), chunk_offsets=(5, 3, 1, 1, 0)),
    "fine-to-coarse-index": dict(chunk_sizes=(1, 2, 4, 8), latent_positions="index"),
    "all-ones": dict(chunk_sizes=(1, 1, 1, 1)),
    "mesh-gqa": dict(num_query_groups=2),
    "qk-layernorm-rmsnorm": dict(qk_layernorm=True, normalization="RMSNorm"),
}


def fresh_attention_env():
    """Megatron's LanguageModule pins NVTE_*_ATTN to the first model's attention_backend and
    asserts that later models agree: each model here starts clean."""
    for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        os.environ.pop(name, None)


def run(case, tp: int, sequence_parallel: bool, attention_backend=AttnBackend.unfused):
    """Loss and full gradients of one step at this layout."""
    fresh_attention_env()
    parallel.initialize(tensor_parallel=tp, seed=7, backend="gloo")
    model = tiny_model(seed=3, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                       attention_backend=attention_backend, **CASES[case])
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    loss = model(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None, labels=labels).mean()
    loss.backward()
    return loss.detach(), full_grads(model, tp, sequence_parallel)


def full_grads(model, tp, sequence_parallel):
    group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(parts, grad.contiguous(), group=group)
            grad = torch.cat(parts, dim=p.partition_dim)
        elif tp > 1 and ((sequence_parallel and getattr(p, "sequence_parallel", False))
                         or "q_layernorm" in name or "k_layernorm" in name):  # as finalize_model_grads sums them
            dist.all_reduce(grad, group=group)
        grads[name] = grad
    return grads


def check_layout_refused():
    """seq 24 at TP=2 leaves 12 tokens per rank: not whole chunks of 8. Must fail, naming them."""
    parallel.initialize(tensor_parallel=2, seed=7, backend="gloo")
    fresh_attention_env()
    model = tiny_model(tensor_model_parallel_size=2, sequence_parallel=True)
    tokens = torch.zeros(1, 24, dtype=torch.long)
    try:
        model(tokens, torch.arange(24)[None], None)
    except ValueError as e:
        if "seq_length/tp = 24/2 = 12 is not a multiple of chunk size 8" in str(e):
            return []
        return [f"wrong layout error: {e}"]
    return ["seq 24 at TP=2 with sequence parallelism and chunk size 8 was not refused"]


def main():
    failures = []
    for case in CASES:
        ref_loss, ref_grads = run(case, tp=1, sequence_parallel=False)
        for sequence_parallel, attention_backend in LAYOUTS:
            layout = f"sp={sequence_parallel} {attention_backend.name}"
            loss, grads = run(case, tp=2, sequence_parallel=sequence_parallel, attention_backend=attention_backend)
            worst = max(((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12)).item()
                        for n, g in grads.items())
            loss_diff = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
            if dist.get_rank() == 0:
                print(f"{case} {layout}: loss rel diff {loss_diff:.2e}, max grad rel diff {worst:.2e}")
            try:
                torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
                for n, g in grads.items():
                    torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{case} {layout} {n}: {m}")
            except AssertionError as e:
                failures.append(f"{case} {layout}: {e}")
    failures += check_layout_refused()
    if failures:
        sys.exit("FAILED\n" + "\n".join(failures))
    if dist.get_rank() == 0:
        print(f"OK {len(CASES)}")
    parallel.destroy()


if __name__ == "__main__":
    main()
