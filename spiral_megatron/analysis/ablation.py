"""The paper's ablations as data: variants, FLOPs matching, run names, the result table.

Pure planning code (STYLE.md): no training, no torch.distributed; tools/ablate.py runs the
plan with the training job. Every variant is the base flavor plus SpiralConfig overrides, so
unique parameters stay those of the base model except where the variant is about compute
(`looped-flops`, `gpt-flops`), which match the spiral model's training FLOPs instead.
"""

import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from spiral_megatron.config import flavors, flops


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table."""

    name: str
    """Short key, used for run folders and on the plot."""

    overrides: Dict = field(default_factory=dict)
    """SpiralConfig overrides of the base flavor (`--model.<key>=<value>` of the training job)."""

    about: str = ""
    """What the row tests (one line, for the table)."""


def _gpt(n_layers: int) -> Dict:
    """A plain GPT of `n_layers` unshared layers (no loop)."""
    return dict(num_prelude_layers=n_layers, num_core_layers=0, num_coda_layers=0, chunk_sizes=())


def model_config(flavor: str, overrides: Dict):
    """The SpiralConfig of `flavor` with `overrides` (CPU-only fields; no process group needed)."""
    return flavors.get(flavor).config(**overrides)


def train_flops_per_sequence(flavor: str, overrides: Dict, seq_length: int, vocab_size: int) -> int:
    return flops.training_flops(model_config(flavor, overrides), seq_length, vocab_size)


def closest(candidates: Iterable[int], cost, target: float) -> int:
    """The candidate whose cost is closest to `target` (ties: the smaller candidate)."""
    return min(candidates, key=lambda k: (abs(cost(k) - target), k))


def variants(flavor: str, seq_length: int, vocab_size: int) -> List[Variant]:
    """Every ablation of the paper (SPEC.md 7, issue 9 section 3) for a looped base flavor."""
    base = model_config(flavor, {})
    sizes = tuple(base.chunk_sizes)
    if not sizes:
        raise ValueError(f"flavor {flavor!r} has no loop (chunk_sizes ()); pick a spiral flavor")
    T, n_pre, n_core, n_post = len(sizes), base.num_prelude_layers, base.num_core_layers, base.num_coda_layers
    cost = lambda overrides: train_flops_per_sequence(flavor, overrides, seq_length, vocab_size)  # noqa: E731
    target = cost({})
    k_loop = closest(range(1, 2 * T + 1), lambda k: cost(dict(chunk_sizes=(1,) * k)), target)
    unique = n_pre + n_core + n_post
    n_gpt = closest(range(1, 4 * (n_pre + n_core * T + n_post) + 1), lambda n: cost(_gpt(n)), target)
    c2f = ",".join(map(str, sizes))
    return [
        Variant("spiral-c2f", {}, f"SpiralFormer {n_pre}+{n_core}R{T}+{n_post}, chunk sizes {c2f} (flavor defaults)"),
        Variant("spiral-f2c", dict(chunk_sizes=tuple(reversed(sizes))), "fine-to-coarse schedule"),
        Variant("looped", dict(chunk_sizes=(1,) * T), f"full-resolution loop, T={T} (same unique params)"),
        Variant("looped-flops", dict(chunk_sizes=(1,) * k_loop), f"full-resolution loop, T={k_loop} (~spiral's FLOPs)"),
        Variant("gpt", _gpt(unique), f"GPT, the same {unique} unique layers once"),
        Variant("gpt-flops", _gpt(n_gpt), f"GPT, {n_gpt} layers (~spiral's FLOPs)"),
        Variant("no-overlap", dict(shift="no-overlap"), "shift s = g instead of g - 1"),
        Variant("residual", dict(topology="residual"), "topology residual [ours]"),
        Variant("anchor", dict(topology="anchor"), "topology anchor (paper baseline)"),
        Variant("mesh", dict(topology="mesh"), "topology MeSH (paper)"),
        Variant("mean-repeat", dict(downscale="mean", upscale="repeat"), "mean down-scale, repeat up-scale"),
    ]


def select(all_variants: Sequence[Variant], names: Optional[Sequence[str]]) -> List[Variant]:
    """The variants named (in the given order); None = all. Unknown names are an error."""
    if not names:
        return list(all_variants)
    by_name = {v.name: v for v in all_variants}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def cli_value(value) -> str:
    """A SpiralConfig override as the training job's command line reads it."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def model_arguments(flavor: str, variant: Variant) -> List[str]:
    """`--model.flavor=...` plus one `--model.<key>=<value>` per override."""
    return [f"--model.flavor={flavor}"] + [f"--model.{k}={cli_value(v)}" for k, v in variant.overrides.items()]


def run_name(variant: str, lr: float, seed: int) -> Tuple[str, str]:
    """(variant folder, run folder) of one training run."""
    return variant, f"lr{lr:g}-seed{seed}"


# ---- results ----

def spread(values: Sequence[float]) -> float:
    """Half the range over seeds (0 for one seed): val loss is reported as mean +- this."""
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def summarize(results: Sequence[Dict]) -> List[Dict]:
    """One row per variant, at its best learning rate (lowest mean val loss over seeds).

    Each result: variant, lr, seed, val_loss, unique_params, train_flops, tokens, tokens_per_s
    (+ anything else, e.g. `about`, `topology`, `chunk_sizes`, copied from the first result).
    """
    groups: Dict[Tuple[str, float], List[Dict]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["lr"]), []).append(r)
    best: Dict[str, Dict] = {}
    order: List[str] = []
    for (name, lr), runs in groups.items():
        losses = [r["val_loss"] for r in runs]
        row = dict(runs[0], lr=lr, seeds=sorted(r["seed"] for r in runs), val_loss=statistics.fmean(losses),
                   val_loss_spread=spread(losses), val_losses=losses,
                   tokens_per_s=statistics.fmean(r["tokens_per_s"] for r in runs))
        row.pop("seed", None)
        if name not in best:
            order.append(name)
        if name not in best or row["val_loss"] < best[name]["val_loss"]:
            best[name] = row
    return [best[n] for n in order]


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def markdown_table(rows: Sequence[Dict]) -> str:
    """The README table: unique params, training FLOPs, tokens, val loss mean +- spread, tokens/s."""
    lines = ["| variant | what | chunk sizes / topology | unique params | training FLOPs | tokens | val loss (mean ± half-range, seeds) | tokens/s | lr |",
             "|---|---|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        loss = f"{r['val_loss']:.4f} ± {r['val_loss_spread']:.4f} ({len(r['seeds'])})"
        shape = f"{','.join(map(str, r.get('chunk_sizes', []))) or '-'} / {r.get('topology', '?') if r.get('chunk_sizes') else '-'}"
        lines.append(f"| {r['variant']} | {r.get('about', '')} | {shape} | {r['unique_params']:,} | {_si(r['train_flops'])} "
                     f"| {_si(r['tokens'])} | {loss} | {r['tokens_per_s']:,.0f} | {r['lr']:g} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Dict], path: str, title: str = "") -> None:
    """Val loss (mean, error bar = half-range over seeds) against training FLOPs, one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.errorbar(r["train_flops"], r["val_loss"], yerr=r["val_loss_spread"], fmt="o", capsize=3)
        ax.annotate(r["variant"], (r["train_flops"], r["val_loss"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    from matplotlib.ticker import EngFormatter, MaxNLocator, NullFormatter

    flops = [r["train_flops"] for r in rows]
    if flops and max(flops) >= 10 * min(flops):  # a log axis only over more than a decade
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap (2.2e11 .. 2.9e11)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(EngFormatter(places=0, sep=" "))  # 250 G, not 2.5e11
    ax.set_xlabel("training FLOPs (spiral_megatron.config.flops, whole run)")
    ax.set_ylabel("validation loss (held-out documents)")
    ax.set_title(title or "ablation: val loss vs training compute")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def is_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
