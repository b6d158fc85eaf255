"""The two conversions end to end (what `tools/convert_to_hf.py` / `convert_from_hf.py` run)."""

import json
from pathlib import Path
from typing import Optional

import torch

from spiral_megatron.conversion import hf_config, hf_io, mapping, megatron_io, model_card
from spiral_megatron.model.model_args import ModelArgs

SAMPLE_TEXT = "SpiralFormer runs a shared core coarse to fine over the sequence, then once more at full resolution."


def expected_hf_shapes(config) -> dict:
    """Every tensor the HF model loads, with its shape (built on the meta device)."""
    from spiral_megatron.hf.modeling_spiral import SpiralForCausalLM

    with torch.device("meta"):
        model = SpiralForCausalLM(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def tokenizer_info(folder: Optional[Path]) -> dict:
    """vocab_size and bos/eos ids of the training run's tokenizer folder ({} without one)."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        return {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    info = {"vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    cfg = folder / "tokenizer_config.json"
    special = json.loads(cfg.read_text()) if cfg.is_file() else {}
    for name in ("bos", "eos"):
        token = special.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and tok.token_to_id(token) is not None:
            info[f"{name}_token_id"] = tok.token_to_id(token)
    return info


def megatron_to_hf_folder(load: str, out: str, iteration: Optional[int] = None, dtype: Optional[str] = None,
                          force: bool = False, max_shard_bytes: int = 2 * 1024**3, extra=None) -> dict:
    """Checkpoint -> HF folder (`extra`: see hf_io.write_hf_folder), its weights in `dtype`
    (default: the checkpoint's, `mapping.stored_dtype`). Returns what `verify` needs (args, state,
    config, out) and the dtype's name."""
    if dtype is not None and dtype not in hf_io.DTYPES:
        raise ValueError(f"dtype {dtype!r} must be one of {tuple(hf_io.DTYPES)}")
    hf_io.prepare_output(Path(out), force)
    folder, iteration = megatron_io.find_checkpoint(load, iteration)
    if (folder / "quantization.json").is_file():  # see spiral_megatron/quantization/checkpoint.py
        raise megatron_io.CheckpointError(
            f"{str(folder)!r} is a quantized checkpoint: export it with "
            f"tools/quantize.py --load {load} --export-hf {out} (fake-quantized weights and scales)")
    args = megatron_io.read_model_args(folder)
    hf_config.check_expressible(args)
    tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
    tok = tokenizer_info(tok_dir)
    config = hf_config.to_hf_config(args, **tok)
    source = mapping.normalize_megatron(megatron_io.read_tensors(folder))
    shapes = hf_config.shapes_of(config)
    state = mapping.megatron_to_hf(source, shapes, config.tie_word_embeddings)
    mapping.check_coverage(state, expected_hf_shapes(config), "Hugging Face")
    torch_dtype = hf_io.DTYPES[dtype] if dtype else mapping.stored_dtype(source)
    dtype = dtype or next(name for name, value in hf_io.DTYPES.items() if value == torch_dtype)
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    config.dtype = torch_dtype
    padding = mapping.vocab_padding(source, shapes)
    card = model_card.model_card(Path(out).name, config, sum(v.numel() for v in state.values()), str(folder),
                                 iteration, bool(padding))
    hf_io.write_hf_folder(Path(out), config, state, tok_dir, padding, force, max_shard_bytes, card, extra)
    return {"args": args, "source": source, "config": config, "out": Path(out), "dtype": torch_dtype,
            "dtype_name": dtype, "iteration": iteration, "tokenizer": tok_dir}


def hf_folder_to_megatron(hf_dir: str, save: str, iteration: int = 0, force: bool = False) -> Path:
    """HF folder -> a checkpoint in the training script's layout (TP1; loads at any layout)."""
    config, state, padding = hf_io.read_hf_folder(Path(hf_dir))
    mapping.check_coverage(state, expected_hf_shapes(config), "Hugging Face")
    args = hf_config.to_model_args(config)
    shapes = hf_config.shapes_of(config)
    local = mapping.pad_vocab(mapping.hf_to_megatron(state, shapes, config.tie_word_embeddings), padding, shapes)
    tok_files = [p for p in Path(hf_dir).iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    return megatron_io.write_checkpoint(save, iteration, args, local, tok_files or None, force)


def sample_ids(config, tokenizer: Optional[Path], length: int = 48) -> torch.Tensor:
    """[1, n] token ids: the sample text through the tokenizer, else fixed random ids."""
    if tokenizer is not None and (tokenizer / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).encode(SAMPLE_TEXT).ids[:length]
        if len(ids) >= 2:
            return torch.tensor([ids])
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (1, min(length, config.max_position_embeddings)), generator=g)


def megatron_logits(args: ModelArgs, source: dict, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Logits [b, n, V_megatron] of the Megatron model with `source` weights (rounded to `dtype`)."""
    model = megatron_io.build_megatron(args, perform_initialization=False)
    weights = {k: v.to(dtype).float() for k, v in source.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the Megatron model: missing {missing}, unexpected {unexpected}")
    model.eval()
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, None).float()


def load_hf(folder: Path):
    """AutoModelForCausalLM from a converted folder, in float32, with its own model code."""
    from transformers import AutoModelForCausalLM

    hf_io.read_config(folder)  # the causal LM's folder, not a classifier's

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()


def verify(result: dict, tolerance: float = 1e-3) -> dict:
    """Megatron vs HF logits on sample text, and the HF cached decode vs its full forward.
    Differences are max abs, in units of max(1, max |logit|); `ok` when both <= tolerance."""
    config, out = result["config"], result["out"]
    ids = sample_ids(config, result.get("tokenizer"))
    ref = megatron_logits(result["args"], result["source"], ids, result["dtype"])[..., : config.vocab_size]
    model = load_hf(out)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cached = cached_logits(model, ids)
    scale = max(1.0, ref.abs().max().item())
    report = {"max_abs_logit_diff": (full - ref).abs().max().item(),
              "max_abs_cached_diff": (cached - full).abs().max().item(), "logit_scale": scale, "tokens": ids.shape[1]}
    report["ok"] = max(report["max_abs_logit_diff"], report["max_abs_cached_diff"]) <= tolerance * scale
    return report


def cached_logits(model, ids: torch.Tensor, prefill: int = 3) -> torch.Tensor:
    """Logits [b, s, V] of an HF SpiralFormer decoding `ids` with its cache: `prefill` tokens,
    then one token per call."""
    out = model(ids[:, :prefill], use_cache=True)
    logits, cache = [out.logits], out.cache
    for k in range(prefill, ids.shape[1]):
        out = model(ids[:, k : k + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.cache
    return torch.cat(logits, dim=1)
