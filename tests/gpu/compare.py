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

Tolerances and the loss-change comparison: tests/formats.py (shared with the CPU format tests).
"""

import math
from typing import Dict, List

import torch

from tests.formats import relative_error

# The parts of SpiralGPTModel whose gradients are compared one by one: a path that gets no
# gradient leaves its part at norm 0, which no tolerance accepts.
PARTS = ("embedding.", "prelude.", "loop.core.", "loop.downscale.", "loop.upscale.", "loop.topology.", "coda.",
         "output_layer.")


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
