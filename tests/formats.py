"""Number formats in tests: tolerances derived from the format, how two runs are compared.

Shared by tests/gpu (runs of the job on GPUs), tests/unit and tests/hf (the models in bf16 and
fp16 against fp32 on CPU) and tests/integration (the job in each format on CPU).

Tolerance [ours]: a relative error (a norm of the difference over the norm of the reference).
Each of the `depth` layers of the unrolled graph (N_compute) rounds what it computes to the
format at least once, a relative error of at most u (the format's unit roundoff); independent
roundings add in quadrature, so a forward is off by about u * sqrt(depth), a gradient (forward
and backward: twice the roundings) by u * sqrt(2 depth). SAFETY covers the few roundings per
layer and a margin. Two runs in low formats (TE vs local, both bf16) add their errors in
quadrature. FP8 rounds the inputs of the TE GEMMs to e4m3 (u = 2^-4): its tolerance is loose by
construction; what bites there is finiteness, no part without gradient, and the loss change.

That bound holds for the logits and for the gradient as a whole, not for every parameter's own
gradient: a parameter whose gradient is a small difference of large terms (the softmax-gated
scorer, allocator and MeSH routers: softmax's backward subtracts the weighted mean) carries the
rounding errors of those terms, many times its own size. `noise_tolerances` measures that per
parameter: the fp32 model run with every computed tensor perturbed by the format's unit
roundoff (`RoundingNoise`), the rounding of the format as noise on the same graph.
"""

import math
import statistics
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "e4m3": 2.0 ** -4, "e5m2": 2.0 ** -3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETY = 2.0
# A parameter's gradient may be off by this many times its error under RoundingNoise (the root
# mean square over the noise samples): the run in the format is one more sample of that noise.
NOISE_SIGMAS = 3.0
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


class RoundingNoise(TorchDispatchMode):
    """Every floating-point tensor an operation computes (forward and backward; not views or
    in-place updates), times (1 + u * U(-1, 1)): the format's rounding, simulated in fp32."""

    def __init__(self, unit_roundoff: float, seed: int):
        super().__init__()
        self.u, self.generator = unit_roundoff, torch.Generator().manual_seed(seed)

    def _perturb(self, t):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
            return t
        noise = torch.rand(t.shape, generator=self.generator, dtype=t.dtype) * 2 - 1
        return t * (1 + self.u * noise)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        return tree_map(self._perturb, out)


def noise_tolerances(gradients: Callable[[], Dict[str, torch.Tensor]], reference: Dict[str, torch.Tensor],
                     fmt: str, depth: int, samples: int = 3) -> Dict[str, float]:
    """{parameter: relative tolerance of its gradient in `fmt`}: `tolerance` for a forward and
    backward through `depth` layers, or NOISE_SIGMAS x the parameter's root-mean-square error
    over `samples` runs of `gradients()` (the fp32 model's gradients) under RoundingNoise,
    whichever is larger."""
    squares = {name: 0.0 for name in reference}
    for seed in range(samples):
        with RoundingNoise(UNIT_ROUNDOFF[fmt], seed):
            noisy = gradients()
        for name, want in reference.items():
            squares[name] += relative_error(noisy[name], want) ** 2 / samples
    floor = tolerance(("fp32", fmt), depth, passes=2)
    return {name: max(floor, NOISE_SIGMAS * math.sqrt(s)) for name, s in squares.items()}


def gradient_failures(fmt: str, depth: int, got: Tuple[torch.Tensor, Dict[str, torch.Tensor]],
                      want: Tuple[torch.Tensor, Dict[str, torch.Tensor]], tolerances: Dict[str, float]
                      ) -> Tuple[List[str], str]:
    """One run in `fmt` against fp32 from the same weights, both (logits, {parameter: gradient}):
    the logits at the forward tolerance of `depth` layers, the gradient as a whole at the
    backward one, every parameter's gradient at its own tolerance (`noise_tolerances`).
    -> (one line per failure, a line of the measured errors)."""
    (logits, grads), (ref_logits, ref_grads) = got, want
    errors = {n: relative_error(grads[n], ref_grads[n]) for n in ref_grads}
    whole = relative_error(torch.cat([grads[n].flatten() for n in ref_grads]),
                           torch.cat([g.flatten() for g in ref_grads.values()]))
    logit_error = relative_error(logits, ref_logits)
    failures = []
    if not logit_error <= tolerance(("fp32", fmt), depth):
        failures.append(f"logits: relative error {logit_error:.3e} > {tolerance(('fp32', fmt), depth):.3e}")
    if not whole <= tolerance(("fp32", fmt), depth, passes=2):
        failures.append(f"whole gradient: relative error {whole:.3e} > {tolerance(('fp32', fmt), depth, 2):.3e}")
    failures += [f"gradient of {n}: relative error {errors[n]:.3e} > {tolerances[n]:.3e}"
                 for n in ref_grads if not errors[n] <= tolerances[n]]
    summary = (f"{fmt}: logits {logit_error:.2e}, whole gradient {whole:.2e}, per parameter max "
               f"{max(errors.values()):.2e} median {statistics.median(errors.values()):.2e}")
    return failures, summary


# How the model tests run each low format: fp16 scales the loss as Megatron's grad scaler does
# (gradients unscaled in fp32 after), bf16 needs no scale.
LOSS_SCALE = {"bf16": 1.0, "fp16": 2.0 ** 12}
# Weight scale of the model tests [ours]: the 0.02 init leaves paths whose gradients lie below
# fp16's range and near zero in any format; with large random weights every path carries gradient.
STD = 0.15


@torch.no_grad()
def large_random_weights(model: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter N(0, STD^2), norm weights 1 + N(0, STD^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(float(name.endswith("norm.weight")) + STD * torch.randn(p.shape, generator=g))


def fp32_reference(run: Callable[[], Tuple[torch.Tensor, Dict[str, torch.Tensor]]], depth: int):
    """(logits, gradients, {fmt: per-parameter tolerances}) of the fp32 model that `run()`
    runs forward and backward (-> (logits, {parameter: gradient}))."""
    logits, grads = run()
    return logits, grads, {fmt: noise_tolerances(lambda: run()[1], grads, fmt, depth) for fmt in LOSS_SCALE}


def assert_like_fp32(fmt: str, depth: int, model: torch.nn.Module, got, reference, label: str) -> None:
    """`got` = (logits, gradients) of `model` in `fmt` against the `fp32_reference`; prints the errors."""
    wrong = {n: (p.dtype, p.grad.dtype) for n, p in model.named_parameters() if not p.dtype == p.grad.dtype == DTYPES[fmt]}
    assert not wrong, f"{label}: parameters or gradients not in {fmt}: {wrong}"
    logits, grads, tolerances = reference
    failures, summary = gradient_failures(fmt, depth, got, (logits, grads), tolerances[fmt])
    print(f"\n{label} {summary}")
    assert not failures, f"{label} in {fmt}:\n" + "\n".join(failures)


def loss_change_failures(ref: Sequence[float], run: Sequence[float], tol: float) -> list:
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
