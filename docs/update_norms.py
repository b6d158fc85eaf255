"""Why `residual` destabilises the coarse levels: per-level update sizes, residual vs anchor vs MeSH.

    PYTHONPATH=. python docs/update_norms.py [--steps 100] [--seeds 0,1] [--out docs/update_norms.json]

Trains the `debug` flavor (d=64, 1+2R4+1, chunk sizes 8,4,2,1) in one process on the bundled
corpus (built on first use, see spiral_megatron.job.data.default_data) with AdamW and the
debug config's schedule, one run per variant and seed, and records at init and at a few steps:
    u/h   RMS of iteration t's token update u_t over the RMS of the state h_t it is added to
    u/h0  RMS of u_t over the RMS of the loop input h0 (its share of the final state, residual)
    beta  mean of the allocator's largest slot weight max_k beta_k (1/g = uniform, 1 = one-hot)
and the training loss, and the held-out loss at the end (the same 32 sequences for every run).
Variants: the three topologies, and residual with the allocation scale sqrt(g) replaced by 1
(the sqrt(g) hypothesis), all with this project's defaults (sqrt(d) embeddings, unrolled init);
and residual with both Pythia options off (the setting of the first observation, issue 9).
Results are summarised in docs/MODEL.md ("Why residual destabilises the coarse levels").
"""

import argparse
import json
import math
import time

import numpy as np
import torch

from spiral_megatron.config import flavors
from spiral_megatron import parallel
from spiral_megatron import functional_spiral as F
from spiral_megatron.model.layer_specs import get_spiral_model_spec
from spiral_megatron.model.spiral_gpt_model import SpiralGPTModel
from spiral_megatron.model.resampling import Allocate
from spiral_megatron.job.data import default_data

SEQ, BATCH, VAL = 128, 16, 32


class UnscaledAllocate(Allocate):
    """The learned allocation without the sqrt(g) factor: slot k receives beta_k * delta."""

    def forward(self, y, delta):
        return F.allocate(self.allocator(y), delta, dim=0) / math.sqrt(self.chunk_size)


VARIANTS = {
    "residual": dict(topology="residual"),
    "residual-alloc-scale-1": dict(topology="residual", _upscale=UnscaledAllocate),
    "anchor": dict(topology="anchor"),
    "mesh": dict(topology="mesh"),
    "residual-no-pythia-init": dict(topology="residual", scale_embeddings=False, unrolled_output_init=False),
}


def token_stream() -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, _ = default_data.ensure(None, 512)
    ds = IndexedDataset(prefix)
    return np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)


def build(variant: dict, seed: int) -> SpiralGPTModel:
    fields = {k: v for k, v in variant.items() if not k.startswith("_")}
    config = flavors.get("debug").config(use_cpu_initialization=True, **fields)
    spec = get_spiral_model_spec(config)
    if "_upscale" in variant:
        spec.loop.upscale = variant["_upscale"]
    torch.manual_seed(seed)
    return SpiralGPTModel(config, vocab_size=512, max_sequence_length=SEQ, spec=spec)


def instrument(model):
    """Record, per iteration, RMS of u_t, of the state h_t it enters, and the allocator's max beta."""
    records = {}
    loop = model.loop
    iteration = loop.iteration

    def recorded(t, h, rope, use_mask):
        u = iteration(t, h, rope, use_mask)
        records.setdefault(t, {})["u"] = u.detach().pow(2).mean().sqrt().item()
        records[t]["h"] = h.detach().pow(2).mean().sqrt().item()
        return u

    loop.iteration = recorded  # this script's own instance, for measurement only
    for key, up in loop.upscale.items():
        if hasattr(up, "allocator"):
            up.allocator.register_forward_hook(
                lambda m, args, out, t=int(key): records.setdefault(t, {}).update(
                    beta=torch.softmax(out.detach().float(), -1).max(-1).values.mean().item()))
    topology_init = loop.topology.init

    def init(h0, embeddings=None):
        records["h0"] = h0.detach().pow(2).mean().sqrt().item()
        return topology_init(h0, embeddings)

    loop.topology.init = init
    return records


def snapshot(records, levels):
    return [{"g": lv.chunk_size, "u/h": records[t]["u"] / records[t]["h"], "u/h0": records[t]["u"] / records["h0"],
             **({"beta": records[t]["beta"]} if "beta" in records[t] else {})} for t, lv in enumerate(levels)]


def lr_at(step: int, steps: int, peak=3e-3, floor=3e-4, warmup=20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def run(name: str, seed: int, steps: int, tokens: np.ndarray, probes=(0, 25, 50, 100)) -> dict:
    model = build(VARIANTS[name], seed)
    records = instrument(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(1000 + seed)  # training data order: per seed, same for every variant
    n_train = len(tokens) - (VAL + 1) * (SEQ + 1)
    val = torch.from_numpy(np.stack([tokens[n_train + i * (SEQ + 1):][: SEQ + 1] for i in range(VAL)]))
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    out = {"variant": name, "seed": seed, "loss": {}, "levels": {}}
    for step in range(steps + 1):
        starts = rng.integers(0, n_train - SEQ - 1, BATCH)
        batch = torch.from_numpy(np.stack([tokens[s : s + SEQ + 1] for s in starts]))
        loss = model(batch[:, :-1], pos, None, labels=batch[:, 1:]).mean()
        if step in probes or step == steps:
            out["levels"][step] = snapshot(records, model.config.levels)
        if step % 10 == 0 or step == steps:
            out["loss"][step] = loss.item()
        if step == steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        vpos = torch.arange(SEQ).expand(VAL, SEQ)
        out["val_loss"] = model(val[:, :-1], vpos, None, labels=val[:, 1:]).mean().item()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="docs/update_norms.json")
    args = parser.parse_args(argv)
    parallel.initialize(tensor_parallel=1, pipeline_parallel=1, seed=1234, backend="gloo")
    tokens = token_stream()
    results = []
    for name in args.variants.split(","):
        for seed in map(int, args.seeds.split(",")):
            start = time.time()
            r = run(name, seed, args.steps, tokens)
            results.append(r)
            lv0, lvN = r["levels"][0], r["levels"][args.steps]
            fmt = lambda lv, k: " ".join(f"{x.get(k, float('nan')):6.3f}" for x in lv)  # noqa: E731
            print(f"{name:24s} seed {seed}: loss@50 {r['loss'].get(50, float('nan')):.3f} loss@{args.steps} {r['loss'][args.steps]:.3f} "
                  f"val {r['val_loss']:.3f} | u/h init [{fmt(lv0, 'u/h')}] end [{fmt(lvN, 'u/h')}] | "
                  f"u/h0 end [{fmt(lvN, 'u/h0')}] | max beta end [{fmt(lvN, 'beta')}] ({time.time() - start:.0f}s)",
                  flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    parallel.destroy()


if __name__ == "__main__":
    main()
