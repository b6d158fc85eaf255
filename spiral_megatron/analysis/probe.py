"""The paper's probes on an HF SpiralFormer (spiral_megatron.hf), batch-first [b, s, d].

Attention, per loop iteration t and per core head (SPEC.md section 7): the core at chunk size
g_t attends over latents; latent j stands for the g_t tokens of its chunk and sits at its
chunk's last token p_j = j*g + g - 1 - w (the position SPEC.md 3.2 gives it). Distances are
measured in TOKENS, p_i - p_j = (i - j) * g, so all resolutions share one scale:
  - entropy           -sum_j a_ij log a_ij (nats), per query latent
  - local mass        sum of a_ij over keys with p_i - p_j < W (a window of W tokens)
  - mean distance     sum_j a_ij (p_i - p_j), in tokens
averaged over every query latent whose chunk holds only real tokens (p_i <= L - 1), over all
samples. Heads are reported all together and as the 40% of (layer, head) pairs whose
attention changes most across iterations (change = total variation of the head's local mass
over t, [ours]: the paper does not define its measure).

States (MeSH, arXiv 2510.07739): h(0) entering the loop, h(t+1) after iteration t; over all
real tokens of all samples:
  - relative update   2 |h(t+1) - h(t)| / (|h(t+1)| + |h(t)|), per token, averaged
  - linear CKA        between every pair of states (tokens as examples)
  - spectrum          singular values of each centered state [N, d], divided by their sum;
                      effective rank = exp(entropy of that distribution)

How attention is captured without a second copy of the model's math: each core layer's
`SpiralAttention._attend(q, k, v)` receives q and k after projection, qk-norm and RoPE; a
wrapper on the instance records them and calls the original. The probabilities are then
softmax(q k^T / sqrt(head_dim)) with the causal mask, exactly the attention `_attend` computes
(scaled_dot_product_attention's default scale). Loop states are recorded by wrapping the
loop's `iteration(t, h, ...)` (h entering iteration t) and a forward hook on the loop (the last).
"""

import math
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch

TOP_FRACTION = 0.4


# ---- attention statistics (pure functions) ----

def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities [b, H, n, n] in float32 from q [b, H, n, hd], k [b, KV, n, hd]."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1) if groups > 1 else k  # query head h uses kv head h // groups
    n = q.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [b, H, n, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def head_sums(probs: torch.Tensor, chunk_size: int, offset: int, real_tokens: int, window: int) -> Dict[str, torch.Tensor]:
    """Per-head SUMS over valid query latents of entropy, local mass and mean token distance,
    and the number of queries summed. probs [b, H, n, n] (rows: queries, columns: keys)."""
    b, H, n, _ = probs.shape
    g = chunk_size
    idx = torch.arange(n, device=probs.device)
    dist = ((idx[:, None] - idx[None, :]) * g).clamp(min=0).float()  # [n, n] tokens; keys after i have a=0
    valid = (idx * g + g - 1 - offset) <= real_tokens - 1  # [n] queries whose chunk is all real tokens
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), torch.zeros_like(probs))
    entropy = -plogp.sum(-1)  # [b, H, n]
    local = (probs * (dist < window)).sum(-1)  # [b, H, n]
    distance = (probs * dist).sum(-1)  # [b, H, n]
    pick = lambda x: x[..., valid].sum(dim=(0, 2)).double()  # noqa: E731  [H]
    return {"entropy": pick(entropy), "local_mass": pick(local), "distance": pick(distance),
            "count": torch.full((H,), float(b * int(valid.sum())), dtype=torch.float64)}


def top_changing_heads(local_mass: torch.Tensor, fraction: float = TOP_FRACTION) -> List[tuple]:
    """(layer, head) pairs, the `fraction` whose local mass [T, layers, heads] varies most over t."""
    T, layers, heads = local_mass.shape
    change = (local_mass[1:] - local_mass[:-1]).abs().sum(0) if T > 1 else torch.zeros(layers, heads)
    k = max(1, math.ceil(fraction * layers * heads))
    order = torch.argsort(change.flatten(), descending=True, stable=True)[:k]
    return sorted((int(i) // heads, int(i) % heads) for i in order)


# ---- state statistics (pure functions) ----

class StateMoments:
    """Running sums over tokens of T+1 loop states [N, d]: means, cross-covariances, update sizes."""

    def __init__(self, num_states: int, d: int, device=None):
        self.n, self.count = num_states, 0
        self.sums = torch.zeros(num_states, d, dtype=torch.float64, device=device)
        self.cross = torch.zeros(num_states, num_states, d, d, dtype=torch.float64, device=device)
        self.update = torch.zeros(max(num_states - 1, 0), dtype=torch.float64, device=device)

    def add(self, states: Sequence[torch.Tensor]) -> None:
        """states: T+1 tensors [b, L, d] of real tokens."""
        xs = [s.reshape(-1, s.shape[-1]).double() for s in states]  # [N, d] each
        self.count += xs[0].shape[0]
        for a, x in enumerate(xs):
            self.sums[a] += x.sum(0)
            for c in range(a, self.n):
                self.cross[a, c] += x.T @ xs[c]
        for t in range(self.n - 1):
            h, f = xs[t], xs[t + 1]
            self.update[t] += (2 * (f - h).norm(dim=-1) / (f.norm(dim=-1) + h.norm(dim=-1)).clamp_min(1e-12)).sum()

    def covariance(self, a: int, c: int) -> torch.Tensor:
        """Centered cross-covariance sum [d, d] of states a and c."""
        lo, hi = min(a, c), max(a, c)
        m = self.cross[lo, hi] - torch.outer(self.sums[lo], self.sums[hi]) / self.count
        return m if a <= c else m.T

    def cka(self) -> torch.Tensor:
        """Linear CKA [T+1, T+1]: ||X_a^T X_c||_F^2 / (||X_a^T X_a||_F ||X_c^T X_c||_F), centered."""
        out = torch.zeros(self.n, self.n, dtype=torch.float64)
        norms = [self.covariance(a, a).norm() for a in range(self.n)]
        for a in range(self.n):
            for c in range(self.n):
                out[a, c] = self.covariance(a, c).norm() ** 2 / (norms[a] * norms[c]).clamp_min(1e-30)
        return out

    def spectra(self) -> torch.Tensor:
        """Singular values of each centered state, descending, divided by their sum [T+1, d]."""
        rows = []
        for a in range(self.n):
            eig = torch.linalg.eigvalsh(self.covariance(a, a)).clamp_min(0).flip(0)  # sigma^2, descending
            sigma = eig.sqrt()
            rows.append(sigma / sigma.sum().clamp_min(1e-30))
        return torch.stack(rows)

    def relative_update(self) -> torch.Tensor:
        return self.update / max(self.count, 1)


def effective_rank(spectrum: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each normalised spectrum [T+1, d] -> [T+1]."""
    p = spectrum.clamp_min(1e-30)
    return torch.exp(-(spectrum * p.log()).sum(-1))


# ---- capture from an HF SpiralFormer ----

def _loop_of(model):
    loop = getattr(getattr(model, "model", model), "loop", None)
    if loop is None:
        raise ValueError("this model has no loop (chunk_sizes is empty): nothing to probe")
    for what in ("iteration", "core"):
        if not hasattr(loop, what):
            raise ValueError(f"the model's loop has no `{what}`: the probe expects spiral_megatron.hf's SpiralLoop")
    return loop


@contextmanager
def recording(model):
    """Within the block, every full forward records `calls[layer]` = [(q, k) per iteration] and
    `states` = [h(0), ..., h(T)] ([b, S or L, d], loop-padded), into the yielded dict."""
    loop = _loop_of(model)
    rec = {"calls": [[] for _ in loop.core.layers], "states": []}
    attns = [layer.self_attn for layer in loop.core.layers]
    originals = [a._attend for a in attns]

    def wrap(i, fn):
        def _attend(q, k, v, *mask):  # a folder's attention may take a key mask (decoding) or not (older)
            rec["calls"][i].append((q.detach(), k.detach()))
            return fn(q, k, v, *mask)
        return _attend

    original_iteration = loop.iteration

    def iteration(t, h, *rest, **kw):
        rec["states"].append(h.detach())
        return original_iteration(t, h, *rest, **kw)

    handle = loop.register_forward_hook(lambda mod, inp, out: rec["states"].append(out.detach()))
    try:
        for i, a in enumerate(attns):
            a._attend = wrap(i, originals[i])  # instance attribute; removed below
        loop.iteration = iteration
        yield rec
    finally:
        handle.remove()
        for a in attns:
            del a._attend
        del loop.iteration


class Probe:
    """Accumulates the probes over batches of token ids; `result()` gives the JSON-able summary."""

    def __init__(self, model, window: int = 16, top_fraction: float = TOP_FRACTION):
        self.model, self.window, self.top_fraction = model, window, top_fraction
        cfg = model.config
        self.chunk_sizes = list(cfg.chunk_sizes)
        self.offsets = list(cfg.offsets) if hasattr(cfg, "offsets") else [0] * len(self.chunk_sizes)
        T, layers, heads = len(self.chunk_sizes), cfg.num_core_layers, cfg.num_attention_heads
        self.sums = {k: torch.zeros(T, layers, heads, dtype=torch.float64)
                     for k in ("entropy", "local_mass", "distance", "count")}
        self.device = next(model.parameters()).device  # the forward and the state moments run there
        self.moments = StateMoments(T + 1, cfg.hidden_size, self.device)
        self.samples = 0

    @torch.no_grad()
    def add(self, input_ids: torch.Tensor) -> None:
        """input_ids [b, L]: one full forward (no cache) under `recording`."""
        L = input_ids.shape[1]
        with recording(self.model) as rec:
            self.model(input_ids.to(self.device), use_cache=False)
        T = len(self.chunk_sizes)
        for layer, calls in enumerate(rec["calls"]):
            if len(calls) != T:
                raise RuntimeError(f"core layer {layer} attended {len(calls)} times in one forward, expected T={T}")
            for t, (q, k) in enumerate(calls):
                sums = head_sums(attention_probs(q, k), self.chunk_sizes[t], self.offsets[t], L, self.window)
                for key, value in sums.items():
                    self.sums[key][t, layer] += value.cpu()
        states = [s[:, :L] for s in rec["states"]]
        if len(states) != T + 1:
            raise RuntimeError(f"recorded {len(states)} loop states, expected T+1={T + 1}")
        self.moments.add(states)
        self.samples += input_ids.shape[0]

    def per_head(self) -> Dict[str, torch.Tensor]:
        """Means [T, layers, heads] of entropy, local_mass, distance."""
        count = self.sums["count"].clamp_min(1)
        return {k: self.sums[k] / count for k in ("entropy", "local_mass", "distance")}

    def result(self) -> Dict:
        per_head = self.per_head()
        top = top_changing_heads(per_head["local_mass"], self.top_fraction)
        mask = torch.zeros(per_head["entropy"].shape[1:], dtype=torch.bool)
        for layer, head in top:
            mask[layer, head] = True

        def summary(select: torch.Tensor) -> List[Dict]:
            rows = []
            for t, g in enumerate(self.chunk_sizes):
                row = {"iteration": t, "chunk_size": g}
                for key in ("entropy", "local_mass", "distance"):
                    row[key] = float(per_head[key][t][select].mean())
                rows.append(row)
            return rows

        spectra = self.moments.spectra()
        return {
            "samples": self.samples, "window_tokens": self.window, "chunk_sizes": self.chunk_sizes,
            "attention": {
                "all_heads": summary(torch.ones_like(mask)),
                "top_heads": summary(mask), "top_fraction": self.top_fraction, "top_head_ids": top,
                "per_head": {k: v.tolist() for k, v in per_head.items()},
            },
            "states": {
                "relative_update": self.moments.relative_update().tolist(),
                "cka": self.moments.cka().tolist(),
                "spectrum": spectra.tolist(),
                "effective_rank": effective_rank(spectra).tolist(),
                "tokens": self.moments.count,
            },
        }


def table(result: Dict) -> str:
    """The printed table: one line per iteration, all heads and top heads, plus the state numbers."""
    att, st = result["attention"], result["states"]
    pct = int(round(100 * att["top_fraction"]))
    lines = [f"probe over {result['samples']} samples; local window W = {result['window_tokens']} tokens",
             f"{'t':>2} {'g':>3} | {'entropy':>8} {'local':>6} {'dist':>7} | top {pct}%: {'entropy':>8} "
             f"{'local':>6} {'dist':>7} | {'rel.upd':>7} {'eff.rank':>8}"]
    for t, (a, b) in enumerate(zip(att["all_heads"], att["top_heads"])):
        lines.append(f"{t:>2} {a['chunk_size']:>3} | {a['entropy']:8.3f} {a['local_mass']:6.3f} {a['distance']:7.1f} | "
                     f"{'':>8}{b['entropy']:8.3f} {b['local_mass']:6.3f} {b['distance']:7.1f} | "
                     f"{st['relative_update'][t]:7.3f} {st['effective_rank'][t + 1]:8.2f}")
    lines.append(f"effective rank of h(0): {st['effective_rank'][0]:.2f}; CKA(h(t), h(t+1)): "
                 + ", ".join(f"{st['cka'][t][t + 1]:.3f}" for t in range(len(st['cka']) - 1)))
    return "\n".join(lines)


def plot(result: Dict, attention_png: str, states_png: Optional[str] = None, title: str = "") -> None:
    """Attention statistics per iteration (all heads and top heads); the state diagnostics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = result["attention"]
    labels = [f"t={r['iteration']}\ng={r['chunk_size']}" for r in att["all_heads"]]
    x = list(range(len(labels)))
    pct = int(round(100 * att["top_fraction"]))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, name in zip(axes, ("entropy", "local_mass", "distance"),
                             ("attention entropy (nats)", f"local mass (< {result['window_tokens']} tokens)",
                              "mean attention distance (tokens)")):
        ax.plot(x, [r[key] for r in att["all_heads"]], "o-", label="all heads")
        ax.plot(x, [r[key] for r in att["top_heads"]], "s--", label=f"top {pct}% changing heads")
        ax.set_xticks(x, labels)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"SpiralFormer probes over {result['samples']} samples", fontsize=11)
    fig.tight_layout()
    fig.savefig(attention_png, dpi=120)
    plt.close(fig)
    if states_png is None:
        return
    st = result["states"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(x, st["relative_update"])
    axes[0].set_xticks(x, labels)
    axes[0].set_title("relative update 2|f(h)-h|/(|f(h)|+|h|)", fontsize=10)
    im = axes[1].imshow(st["cka"], vmin=0, vmax=1, cmap="viridis")
    axes[1].set_title("linear CKA between h(0..T)", fontsize=10)
    axes[1].set_xlabel("state h(t)")
    axes[1].set_ylabel("state h(t)")
    fig.colorbar(im, ax=axes[1])
    for t, spec in enumerate(st["spectrum"]):
        axes[2].semilogy(range(1, len(spec) + 1), [max(s, 1e-12) for s in spec], label=f"h({t})")
    axes[2].set_title("singular values of each state", fontsize=10)
    axes[2].set_xlabel("index i (largest first)")
    axes[2].set_ylabel(r"$\sigma_i \,/\, \sum_j \sigma_j$")  # normalised as in `result` (module docstring)
    axes[2].legend(fontsize=7)
    fig.suptitle(title.replace("probes of", "state diagnostics of", 1) if title
                 else f"SpiralFormer state diagnostics over {result['samples']} samples", fontsize=11)
    fig.tight_layout()
    fig.savefig(states_png, dpi=120)
    plt.close(fig)
