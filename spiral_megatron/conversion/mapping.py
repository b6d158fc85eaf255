"""Megatron <-> Hugging Face parameter names: one table plus named transforms (pure functions).

Megatron side: the local spec's module names, one key per layer (`prelude.layers.0...`).
`normalize_megatron` first brings any source to that form: dist-checkpoint keys whose layers
are stacked on a leading dim (`prelude.layers.mlp.linear_fc1.weight` [n, ...]) and Transformer
Engine names (the layer norm fused into `linear_qkv` / `linear_fc1` as `layer_norm_weight`).

Each table row: (Megatron pattern, HF pattern(s), transform). `{i}` is a layer index, `{t}` a
loop iteration. Transforms:
    copy   the same tensor
    qkv    Megatron's fused QKV, per query group [q_1..q_n, k, v], <-> q_proj, k_proj, v_proj
    glu    Megatron's gated linear_fc1 [gate; up] <-> gate_proj, up_proj
    vocab  the embedding / output rows, padded for TP in Megatron, trimmed to the tokenizer
The reverse direction inverts the same table. Both directions check coverage: every source
tensor is used or explicitly dropped, every target tensor is written, shapes match.
"""

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

StateDict = Dict[str, torch.Tensor]

BLOCKS = (("prelude", "model.prelude.layers"), ("loop.core", "model.loop.core.layers"), ("coda", "model.coda.layers"))
LAYER = [  # (Megatron name inside a layer, HF name(s) inside a layer, transform)
    ("input_layernorm.{p}", "input_layernorm.{p}", "copy"),
    ("self_attention.linear_qkv.{p}", ("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"), "qkv"),
    ("self_attention.linear_proj.{p}", "self_attn.o_proj.{p}", "copy"),
    ("self_attention.q_layernorm.{p}", "self_attn.q_norm.{p}", "copy"),
    ("self_attention.k_layernorm.{p}", "self_attn.k_norm.{p}", "copy"),
    ("pre_mlp_layernorm.{p}", "post_attention_layernorm.{p}", "copy"),
    ("mlp.linear_fc1.{p}", "mlp.up_proj.{p}", "fc1"),  # "glu" when gated, see `rules`
    ("mlp.linear_fc2.{p}", "mlp.down_proj.{p}", "copy"),
]
TOP = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", "vocab"),
    ("output_layer.weight", "lm_head.weight", "vocab"),
    ("coda.final_layernorm.{p}", "model.norm.{p}", "copy"),
    ("loop.downscale.{t}.scorer.weight", "model.loop.aggregate.{t}.weight", "copy"),
    ("loop.upscale.{t}.allocator.{p}", "model.loop.allocate.{t}.{p}", "copy"),
    ("loop.topology.write_router.{t}.{p}", "model.loop.mesh_write.{t}.{p}", "copy"),
    ("loop.topology.read_router.{t}.{p}", "model.loop.mesh_read.{t}.{p}", "copy"),
    ("loop.topology.init_write_router.{p}", "model.loop.mesh_init_write.{p}", "copy"),
    ("loop.topology.init_read_router.{p}", "model.loop.mesh_init_read.{p}", "copy"),
]
TE_NAMES = {  # Transformer Engine fuses the pre-norms into the next linear
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
DROPPED = (re.compile(r".*\._extra_state$"),)  # TE/FP8 metadata, no weights
PLACEHOLDERS = {"i": r"(?P<i>\d+)", "t": r"(?P<t>\d+)", "p": r"(?P<p>weight|bias)"}


@dataclass(frozen=True)
class Shapes:
    """What the transforms need to know about the architecture."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    gated_linear_unit: bool
    vocab_size: int  # HF rows (the tokenizer's vocabulary)
    megatron_vocab_size: int  # Megatron rows (padded for TP)


def rules(gated: bool) -> List[Tuple[str, Sequence[str], str]]:
    """The full table: per-block layer rows plus the model's own rows."""
    table = []
    for mcore_block, hf_block in BLOCKS:
        for mcore, hf, fn in LAYER:
            hf = (hf,) if isinstance(hf, str) else hf
            if fn == "fc1":
                fn, hf = ("glu", ("mlp.gate_proj.{p}", "mlp.up_proj.{p}")) if gated else ("copy", hf)
            table.append((f"{mcore_block}.layers.{{i}}.{mcore}", tuple(f"{hf_block}.{{i}}.{h}" for h in hf), fn))
    table += [(m, (h,), fn) for m, h, fn in TOP]
    return table


def _regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern)
    for name, rx in PLACEHOLDERS.items():
        out = out.replace(re.escape("{" + name + "}"), rx)
    return re.compile(out + "$")


# ---- transforms: forward (Megatron -> HF) and inverse ----
def split_qkv(w: torch.Tensor, s: Shapes) -> List[torch.Tensor]:
    """[ng * (nq/ng + 2) * hd, ...] grouped as q_1..q_n, k, v per group -> q, k, v."""
    q = s.num_attention_heads // s.num_query_groups
    grouped = w.reshape(s.num_query_groups, q + 2, s.head_dim, *w.shape[1:])
    rest = w.shape[1:]
    return [
        grouped[:, :q].reshape(-1, *rest).clone(),
        grouped[:, q].reshape(-1, *rest).clone(),
        grouped[:, q + 1].reshape(-1, *rest).clone(),
    ]


def merge_qkv(parts: Sequence[torch.Tensor], s: Shapes) -> torch.Tensor:
    q, k, v = parts
    ng, hd, rest = s.num_query_groups, s.head_dim, q.shape[1:]
    grouped = torch.cat(
        [q.reshape(ng, -1, hd, *rest), k.reshape(ng, 1, hd, *rest), v.reshape(ng, 1, hd, *rest)], dim=1
    )
    return grouped.reshape(-1, *rest)


TRANSFORMS: Dict[str, Tuple[Callable, Callable]] = {
    "copy": (lambda w, s: [w], lambda parts, s: parts[0]),
    "qkv": (split_qkv, merge_qkv),
    "glu": (lambda w, s: [c.clone() for c in torch.chunk(w, 2, dim=0)], lambda parts, s: torch.cat(parts, dim=0)),
    "vocab": (lambda w, s: [w[: s.vocab_size]], lambda parts, s: parts[0]),  # padding rows: see pad_vocab
}


# ---- source normalization ----
def normalize_megatron(sd: StateDict) -> StateDict:
    """Any Megatron source (dist checkpoint or module state dict, local or TE names) -> local
    per-layer names. `_extra_state` entries are dropped here (explicitly, see DROPPED)."""
    out = {}
    stacked = re.compile(r"^(prelude|loop\.core|coda)\.layers\.(?!\d+\.)(.+)$")
    for key, value in sd.items():
        if any(rx.match(key) for rx in DROPPED) or not isinstance(value, torch.Tensor):
            continue
        m = stacked.match(key)
        if m:  # layers stacked on dim 0 by the dist checkpoint
            for i in range(value.shape[0]):
                out[_local_name(f"{m.group(1)}.layers.{i}.{m.group(2)}")] = value[i]
        else:
            out[_local_name(key)] = value
    return out


def _local_name(key: str) -> str:
    for te, local in TE_NAMES.items():
        if key.endswith("." + te):
            return key[: -len(te)] + local
    return key


# ---- conversion ----
def megatron_to_hf(sd: StateDict, shapes: Shapes, tied: bool) -> StateDict:
    """Megatron (normalized) -> HF state dict; raises KeyError on an unmapped source tensor."""
    table = [(_regex(m), h, fn) for m, h, fn in rules(shapes.gated_linear_unit)]
    out = {}
    for key, value in sd.items():
        for rx, hf, fn in table:
            match = rx.match(key)
            if match:
                names = [h.format(**match.groupdict()) for h in hf]
                out.update(zip(names, TRANSFORMS[fn][0](value, shapes)))
                break
        else:
            raise KeyError(f"Megatron tensor {key!r} {tuple(value.shape)} has no row in the name table")
    if tied:
        out.pop("lm_head.weight", None)
    return out


def hf_to_megatron(sd: StateDict, shapes: Shapes, tied: bool) -> StateDict:
    """HF -> Megatron local names (vocab rows not yet padded: see `pad_vocab`)."""
    out, used = {}, set()
    for mcore, hf, fn in rules(shapes.gated_linear_unit):
        rxs = [_regex(h) for h in hf]
        for key in sd:
            match = rxs[0].match(key)
            if not match:
                continue
            fields = match.groupdict()
            names = [h.format(**fields) for h in hf]
            missing = [n for n in names if n not in sd]
            if missing:
                raise KeyError(f"HF tensors {missing} are missing (needed with {key!r} for {mcore.format(**fields)!r})")
            out[mcore.format(**fields)] = TRANSFORMS[fn][1]([sd[n] for n in names], shapes)
            used.update(names)
    if tied:
        out.pop("output_layer.weight", None)
        used.add("lm_head.weight")
    unused = sorted(set(sd) - used)
    if unused:
        raise KeyError(f"HF tensors with no row in the name table: {unused}")
    return out


def pad_vocab(sd: StateDict, padding: StateDict, shapes: Shapes) -> StateDict:
    """Append the Megatron vocabulary padding rows (kept by the forward conversion; zeros if
    they were not kept) to the embedding and output layer."""
    out = dict(sd)
    extra = shapes.megatron_vocab_size - shapes.vocab_size
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in out and extra > 0:
            w = out[key]
            rows = padding.get(key, w.new_zeros(extra, *w.shape[1:]))
            if rows.shape != (extra, *w.shape[1:]):
                raise ValueError(f"vocab padding of {key!r} has shape {tuple(rows.shape)}, expected {(extra, *w.shape[1:])}")
            out[key] = torch.cat([w, rows.to(w.dtype)], dim=0)
    return out


def vocab_padding(sd: StateDict, shapes: Shapes) -> StateDict:
    """The Megatron rows beyond the tokenizer's vocabulary, which the HF model does not use."""
    return {k: sd[k][shapes.vocab_size :].clone() for k in ("embedding.word_embeddings.weight", "output_layer.weight")
            if k in sd and sd[k].shape[0] > shapes.vocab_size}


def stored_dtype(sd: StateDict) -> torch.dtype:
    """The dtype a state's weights are stored in: the format the model trained in (Megatron keeps
    its fp32 main weights in the optimizer's state, not among these). float32 when they differ
    or are none of the training formats."""
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    one = dtypes.pop() if len(dtypes) == 1 else None
    return one if one in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def check_coverage(produced: StateDict, expected: Dict[str, torch.Size], side: str) -> None:
    """Every expected tensor written, nothing extra, shapes equal; errors list the names."""
    missing = sorted(set(expected) - set(produced))
    extra = sorted(set(produced) - set(expected))
    wrong = sorted(k for k in set(produced) & set(expected) if tuple(produced[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        lines = [f"{side} tensors do not match the model:"]
        if missing:
            lines.append(f"  not written: {missing}")
        if extra:
            lines.append(f"  not in the model: {extra}")
        for k in wrong:
            lines.append(f"  {k}: shape {tuple(produced[k].shape)}, model has {tuple(expected[k])}")
        raise ValueError("\n".join(lines))
