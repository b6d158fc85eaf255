"""One forward and backward of the training job's model from a weights file; writes what
tests/gpu/compare.py compares.

    python tests/gpu/forward_worker.py --out RUN.pt (--save-weights W.pt | --load-weights W.pt) -- JOB FLAGS

Writes the logits, the loss, the gradient norms (in total and per part) and every parameter's
gradient in fp32 under its checkpoint key (the same for the local and the TE layers).
The model is the job's own (`job/build.py: build` of the resolved settings, i.e. Megatron DDP, fusions, precision,
backend and attention from the job flags, e.g. `--precision bf16 --model.transformer_impl
transformer_engine`), on the GPU where there is one, else on the CPU. `--save-weights` writes
its seed-drawn weights in fp32 under their checkpoint keys (the keys Megatron's distributed
checkpoint uses, the same for the local and the Transformer Engine layers); `--load-weights`
copies such a file into the model first, so runs in other formats or backends start from the
same checkpoint. One batch of BATCH x seq_length tokens drawn from a fixed seed.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEBUG = ROOT / "examples" / "configs" / "debug-cpu.yaml"
BATCH = 2


def checkpoint_pieces(module, tensors: dict = None):
    """{checkpoint key (@ the core's stacked layer index): this rank's view of it} of every
    parameter; at TP=PP=1 each view is the whole tensor. With `tensors` ({parameter name: a
    tensor laid out like it}, e.g. its gradient), the same views of those tensors instead."""
    from spiral_megatron.model.init import _pieces, _sharded_params

    out = {}
    sharded = _sharded_params(module)
    for name, p in module.named_parameters():
        if id(p) not in sharded:
            raise RuntimeError(f"parameter {name} has no checkpoint key")
        for st in _pieces(sharded[id(p)]):
            view = st.data
            if tensors is not None:
                t = tensors[name]
                if t.shape != p.shape or t.stride() != p.stride():
                    raise RuntimeError(f"{name}: {tuple(t.shape)}/{t.stride()} is not laid out like the parameter")
                view = t.as_strided(view.shape, view.stride(), t.storage_offset() + view.storage_offset() - p.storage_offset())
            out[st.key + "".join(f"@{i}" for i in st.global_offset[: st.prepend_axis_num])] = view
    return out


@torch.no_grad()
def load_weights(module, path) -> None:
    saved = torch.load(path, map_location="cpu")
    pieces = checkpoint_pieces(module)
    if set(pieces) != set(saved):
        raise RuntimeError(f"checkpoint keys differ: missing {sorted(set(pieces) - set(saved))}, "
                           f"unexpected {sorted(set(saved) - set(pieces))}")
    for key, view in pieces.items():
        view.copy_(saved[key].reshape(view.shape))


def main(argv) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--save-weights")
    weights.add_argument("--load-weights")
    args, job_args = parser.parse_known_args(argv)
    job_args = [a for a in job_args if a != "--"]

    from spiral_megatron import parallel
    from spiral_megatron.job.build import build
    from spiral_megatron.job.settings.resolve import resolve
    from tests.gpu.compare import part_norms

    job = resolve(job_args, DEBUG)
    on_cpu = job.on_cpu
    parallel.initialize(tensor_parallel=1, pipeline_parallel=1, seed=job.keys.seed)
    parts = build(job)
    module = parts.module
    if args.save_weights:
        torch.save({k: v.detach().float().cpu() for k, v in checkpoint_pieces(module).items()}, args.save_weights)
    else:
        load_weights(module, args.load_weights)

    device = "cpu" if on_cpu else torch.cuda.current_device()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, job.data.vocab_size, (BATCH, job.seq_length + 1), generator=g).to(device)
    positions = torch.arange(job.seq_length, device=device).expand(BATCH, -1)
    logits = parts.model(tokens[:, :-1], positions, None)  # [b, s, V]
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    parts.model.finish_grad_sync()
    grads = {}
    for name, p in module.named_parameters():
        grad = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad  # DDP's buffer, fp32
        grads[name] = grad if grad is not None else torch.zeros_like(p)  # no gradient at all counts as zero
    norms = part_norms(grads)
    core = module.loop.core.layers[0].self_attention.core_attention
    torch.save({
        "logits": logits.detach().float().cpu(), "loss": loss.item(), "group_norms": norms,
        "grads": {k: v.detach().float().cpu().clone() for k, v in checkpoint_pieces(module, grads).items()},
        "grad_norm": math.sqrt(sum(n * n for n in norms.values())),
        "attention": type(core).__name__, "dtype": str(next(module.parameters()).dtype),
    }, args.out)
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
