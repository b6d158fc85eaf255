"""A lower-bound estimate of one process's training memory, checked before the first step.

A micro-batch far beyond memory used to be killed by the kernel minutes later with no message.
The estimate errs low (no false refusals): it counts only what must be alive at the peak.
- weights, gradients and Adam's two moments: 16 bytes per local parameter (fp32), 18 with a
  bf16/fp16 model (fp32 main grads and master weights);
- activations kept for backward over the UNROLLED graph: per layer at length n and per
  sequence, about 18*d + 2*heads*n values per position (layer inputs, q/k/v, MLP, attention
  probabilities of the unfused local path), divided by tensor parallelism; MeSH keeps its B
  slots per iteration; the loss keeps fp32 logits and their gradient;
- with pipelining, 1F1B holds about one micro-batch of the whole model at its peak.
"""

import os
from dataclasses import dataclass

from spiral_megatron.config import schedule

GIB = 1 << 30


@dataclass
class Estimate:
    state: float  # bytes: weights, gradients, optimizer moments
    activations: float  # bytes: one micro-batch's saved activations and logits

    @property
    def total(self) -> float:
        return self.state + self.activations


def estimate(c, seq_length: int, micro_batch: int, vocab_size: int, local_params: int,
             precision: str) -> Estimate:
    """The estimate for SpiralConfig `c` (tensor parallel size read from it)."""
    act_bytes = 4 if precision == "fp32" else 2
    tp = c.tensor_model_parallel_size
    d, heads = c.hidden_size, c.num_attention_heads

    def layer(n: int) -> float:  # values per sequence saved by one layer at length n
        return n * (18 * d + 2 * heads * n)

    values = (c.num_prelude_layers + c.num_coda_layers) * layer(seq_length)
    for lv in c.levels:
        values += c.num_core_layers * layer(schedule.latent_length(seq_length, lv))
        if c.topology == "mesh":
            values += c.mesh_slots * seq_length * d * tp  # not split over TP
    activations = micro_batch * (values / tp * act_bytes + 2 * seq_length * vocab_size / tp * 4)
    state = local_params * (16 if precision == "fp32" else 18)
    return Estimate(state, activations)


def available_bytes(on_cpu: bool) -> tuple:
    """(bytes one process may use, how that was found)."""
    if on_cpu:
        import psutil

        procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        free = psutil.virtual_memory().available
        return free / procs, f"{free / GIB:.1f} GiB available / {procs} process{'es' if procs > 1 else ''}"
    import torch

    total = torch.cuda.mem_get_info()[1]
    return total, f"{torch.cuda.get_device_name()} has {total / GIB:.1f} GiB"


def refusal(est: Estimate, available: float, where: str, micro_batch: int, seq_length: int):
    """The one-line refusal when the estimate exceeds what is available, else None."""
    if est.total <= available:
        return None
    return (f"micro_batch_size {micro_batch} x seq_length {seq_length} needs at least "
            f"{est.total / GIB:.1f} GiB per process (activations {est.activations / GIB:.1f} GiB, "
            f"weights + gradients + Adam {est.state / GIB:.1f} GiB), more than the "
            f"{available / GIB:.1f} GiB it has ({where}); lower micro_batch_size (gradient "
            "accumulation keeps global_batch_size), add tensor or pipeline parallelism, or set "
            "check_memory false")


def check(module, seq_length: int, micro_batch: int, vocab_size: int, precision: str, on_cpu: bool) -> None:
    """Raise ConfigError when the built `module` cannot train a micro-batch here."""
    from spiral_megatron.job.settings.config import ConfigError

    local = sum(p.numel() for p in module.parameters())
    est = estimate(module.config, seq_length, micro_batch, vocab_size, local, precision)
    available, where = available_bytes(on_cpu)
    line = refusal(est, available, where, micro_batch, seq_length)
    if line:
        raise ConfigError(line)
