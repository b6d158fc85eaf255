"""How tests/gpu compares two runs from the same checkpoint: tolerances derived from the number
format, and comparisons that fail on a path with zero or non-finite gradients.

Pure functions over what `forward_worker.py` writes ({"logits", "loss", "grad_norm",
"group_norms", "grads"}) and over logged losses; tests/unit/test_gpu_compare.py runs them on CPU.
Gradients are compared per part (norms) and per parameter (each gradient tensor under its
checkpoint key): a wrong gradient in one small tensor, e.g. a MeSH router's, hardly moves its
part's norm. A parameter's error is relative to its own norm, but never to less than its even
share of the whole gradient's norm, ||g|| sqrt(n_p / N) [ours]: backpropagation rounds the terms
a gradient sums, and some gradients cancel to far below their terms (the MeSH write routers', at
1e-7..1e-6 of ||g||, differ by 1e-4 of their own norm between two fp32 attention backends,
2e-8 of their share; every other parameter there by at most 5e-7 of its norm).

Tolerance [ours]: a relative error (a norm of the difference over the norm of the reference).
Each of the `depth` layers of the unrolled graph (N_compute) rounds what it computes to the
format at least once, a relative error of at most u (the format's unit roundoff); independent
roundings add in quadrature, so a forward is off by about u * sqrt(depth), a gradient (forward
and backward: twice the roundings) by u * sqrt(2 depth). SAFETY covers the few roundings per
layer and a margin. Two runs in low formats (TE vs local, both bf16) add their errors in
quadrature. FP8 rounds the inputs of the TE GEMMs to e4m3 (u = 2^-4): its tolerance is loose by
construction; what bites there is finiteness, no part without gradient, and the loss change.
"""

import math
from typing import Dict, List, Sequence

import torch

UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "e4m3": 2.0 ** -4, "e5m2": 2.0 ** -3}
SAFETY = 2.0
# The parts of SpiralGPTModel whose gradients are compared one by one: a path that gets no
# gradient leaves its part at norm 0, which no tolerance accepts.
PARTS = ("embedding.", "prelude.", "loop.core.", "loop.downscale.", "loop.upscale.", "loop.topology.", "coda.",
         "output_layer.")
# The loss must fall at least this much over the compared steps (nats) for the change to mean anything.
MIN_LOSS_DROP = 0.3


def tolerance(formats: Sequence[str], depth: int, passes: int = 1) -> float:
    """Relative tolerance between two runs in `formats` (e.g. ("fp32", "bf16")) after `passes`
    sweeps (1 forward, 2 forward + backward) through `depth` layers."""
    return SAFETY * math.sqrt(passes * depth * sum(UNIT_ROUNDOFF[f] ** 2 for f in formats))


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp32 (inf when either is not finite)."""
    x, ref = x.float(), ref.float()
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return math.inf
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def part_norms(grads: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The fp32 gradient norm of each part in PARTS that has parameters ({name: grad})."""
    squares: Dict[str, float] = {}
    for name, g in grads.items():
        part = next((p for p in PARTS if name.startswith(p)), None)
        if part is None:
            raise ValueError(f"parameter {name} is in none of the compared parts {PARTS}")
        squares[part] = squares.get(part, 0.0) + g.float().pow(2).sum().item()
    return {part: math.sqrt(s) for part, s in squares.items()}


def forward_failures(ref: dict, run: dict, forward_tol: float, grad_tol: float) -> List[str]:
    """One line per way `run` is not `ref` (both from forward_worker.py); empty if it is."""
    failures = []
    err = relative_error(run["logits"], ref["logits"])
    if not err <= forward_tol:
        failures.append(f"logits: relative error {err:.3e} > {forward_tol:.3e}")
    for name, result in (("reference", ref), ("run", run)):
        dead = [p for p, n in result["group_norms"].items() if not (0 < n < math.inf)]
        if dead:
            failures.append(f"{name}: gradient norm zero or not finite in {dead}")
    if set(run["group_norms"]) != set(ref["group_norms"]):
        failures.append(f"parts with gradients differ: {sorted(run['group_norms'])} vs {sorted(ref['group_norms'])}")
    for part, norm in [("all", run["grad_norm"])] + sorted(run["group_norms"].items()):
        want = ref["grad_norm"] if part == "all" else ref["group_norms"].get(part, 0.0)
        diff = abs(norm - want) / want if want > 0 else math.inf
        if not diff <= grad_tol:
            failures.append(f"gradient norm of {part}: {norm:.6g} vs {want:.6g}, relative {diff:.3e} > {grad_tol:.3e}")
    return failures + gradient_failures(ref["grads"], run["grads"], grad_tol)


def gradient_failures(ref: Dict[str, torch.Tensor], run: Dict[str, torch.Tensor], tol: float) -> List[str]:
    """One line per parameter (checkpoint key) whose gradient in `run` is not `ref`'s within
    `tol` (relative to the larger of its norm and its share of the total, see above), or that
    only one of them has."""
    if set(run) != set(ref):
        return [f"gradients of different parameters: missing {sorted(set(ref) - set(run))}, "
                f"unexpected {sorted(set(run) - set(ref))}"]
    total = math.sqrt(sum(g.float().pow(2).sum().item() for g in ref.values()))
    count = sum(g.numel() for g in ref.values())
    failures = []
    for key in sorted(ref):
        if run[key].shape != ref[key].shape:
            failures.append(f"gradient of {key}: shape {tuple(run[key].shape)} vs {tuple(ref[key].shape)}")
            continue
        scale = max(ref[key].float().norm().item(), total * math.sqrt(ref[key].numel() / count))
        err = relative_error(run[key], ref[key]) * ref[key].float().norm().item() / scale
        if not err <= tol:
            failures.append(f"gradient of {key}: error {err:.3e} of its scale > {tol:.3e}")
    return failures


def loss_change_failures(ref: Sequence[float], run: Sequence[float], tol: float) -> List[str]:
    """The loss must fall over the steps in both runs, by the same amount within `tol` (relative)."""
    failures = []
    if len(run) != len(ref):
        return [f"{len(run)} logged steps vs {len(ref)}"]
    if not all(math.isfinite(x) for x in list(ref) + list(run)):
        return ["a loss is not finite"]
    drop_ref, drop = ref[0] - ref[-1], run[0] - run[-1]
    if drop_ref < MIN_LOSS_DROP:
        failures.append(f"the reference's loss fell {drop_ref:.4f} < {MIN_LOSS_DROP} over {len(ref)} steps")
    diff = abs(drop - drop_ref) / max(drop_ref, 1e-12)
    if not diff <= tol:
        failures.append(f"loss change {drop:.4f} vs {drop_ref:.4f} over {len(ref)} steps, relative {diff:.3e} > {tol:.3e}")
    return failures
