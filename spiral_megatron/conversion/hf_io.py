"""Writing and reading a Hugging Face model folder (safetensors only).

A folder holds config.json (with `auto_map`), generation_config.json, the model files of
`spiral_megatron/hf/`, the tokenizer files of the training run (a standard
`PreTrainedTokenizerFast`, no remote code, padding on the left with the end-of-document token, as
causal-LM repositories ship it), the weights as
model.safetensors (or shards plus model.safetensors.index.json above `max_shard_bytes`), and
megatron_vocab_padding.safetensors: the Megatron rows beyond the tokenizer's vocabulary, which
the HF model does not use and the reverse conversion puts back (bit-exact round trip).
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from spiral_megatron import hf as hf_package
from spiral_megatron.conversion.mapping import StateDict
from spiral_megatron.errors import SaveFailed, space_left
from spiral_megatron.hf.configuration_spiral import SpiralFormerConfig

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PADDING = "megatron_vocab_padding.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prepare_output(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder unless `force` (checked before any work)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"output {str(out)!r} exists and is not empty; pass --force to replace it")


def write_hf_folder(out: Path, config: SpiralFormerConfig, state: StateDict, tokenizer: Optional[Path] = None,
                    padding: Optional[StateDict] = None, force: bool = False,
                    max_shard_bytes: int = 2 * 1024**3, card: Optional[str] = None,
                    extra: Optional[Callable[[Path, SpiralFormerConfig], None]] = None) -> Path:
    """Everything is written into a temporary sibling folder, swapped in at the end (`_swap_in`);
    `card`: the README.md (the Hub's model card); `extra(folder, config)` writes more files into
    it (a quantized export's scales), so they arrive with the rest or not at all."""
    out = Path(out)
    remove_stale_temporaries(out)
    prepare_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the folder follows the umask
    try:
        config.save_pretrained(str(tmp))
        _write_generation_config(tmp, config)
        for path in hf_package.model_files():
            shutil.copy2(path, tmp / path.name)
        if tokenizer is not None:
            _write_tokenizer(Path(tokenizer), tmp, config.max_position_embeddings)
        _write_weights(tmp, state, max_shard_bytes)
        if padding:
            save_file({k: v.contiguous() for k, v in padding.items()}, str(tmp / PADDING), metadata={"format": "pt"})
        if card is not None:
            (tmp / "README.md").write_text(card)
        if extra is not None:
            extra(tmp, config)
        for f in tmp.iterdir():  # safetensors writes owner-only (0600) files; every file follows the umask
            os.chmod(f, 0o666 & ~_umask())
        _swap_in(tmp, out)
    except (OSError, SafetensorError) as e:  # a full disk, a broken mount
        left = space_left(out.parent)  # before what was written is deleted
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(f"writing {out} failed ({type(e).__name__}: {e}); {left}; "
                         f"{out} holds what it held before") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_in(new: Path, out: Path) -> None:
    """Rename the old `out` aside, `new` in, then delete the old one: a kill at any point leaves
    either folder complete under `out` (or the old one under its hidden `.old` name)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def remove_stale_temporaries(out: Path) -> None:
    """Delete the hidden folders an interrupted earlier conversion to `out` left: its temporary
    (`.NAME.xxxxxxxx`, tempfile's 8 characters) and a replaced old folder (`.NAME.old-PID`).
    A replaced folder is renamed back instead when `out` itself is missing (a kill between the
    two renames of `_swap_in`): it is then the only complete copy."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(old-\d+|[a-z0-9_]{{8}})")
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir(), key=lambda p: not p.name.startswith(f".{out.name}.old-")):
        if p.is_dir() and pattern.fullmatch(p.name):
            if p.name.startswith(f".{out.name}.old-") and not out.exists():
                os.replace(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _write_tokenizer(src: Path, folder: Path, max_length: int) -> None:
    """The training run's tokenizer files, with what batched generation needs added to
    tokenizer_config.json: a pad token (the end-of-document token, as the generation config's
    pad id) and left padding, so `tokenizer(prompts, padding=True)` feeds `generate` directly."""
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, folder / f.name)
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {"tokenizer_class": "PreTrainedTokenizerFast"}
    cfg.setdefault("pad_token", cfg.get("eos_token"))
    cfg.update(padding_side="left", model_max_length=max_length)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _write_generation_config(folder: Path, config: SpiralFormerConfig) -> None:
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
           "do_sample": False, "use_cache": True}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _write_weights(folder: Path, state: StateDict, max_shard_bytes: int) -> None:
    shards, current, size = [], {}, 0
    for name in sorted(state):
        t = state[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def read_config(folder: Path) -> SpiralFormerConfig:
    """config.json of a folder that holds the causal LM: a fine-tuned classifier's folder
    (AutoModelForSequenceClassification) has no output layer, and its score has no Megatron
    counterpart, so the converter and the tools refuse it rather than start a new lm_head."""
    config = SpiralFormerConfig.from_pretrained(str(folder))
    heads = [a for a in config.architectures or [] if a != "SpiralForCausalLM"]
    if heads:
        raise ValueError(f"{str(folder)!r} holds a {heads[0]} (config.json's architectures), not the causal LM "
                         "SpiralForCausalLM: its next-token output layer is not in the folder")
    return config


def read_hf_folder(folder: Path):
    """(SpiralFormerConfig, weights, vocab padding) of a folder; only safetensors are loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face folder {str(folder)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json")
    config = read_config(folder)
    if (folder / INDEX).is_file():
        files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        raise FileNotFoundError(f"{str(folder)!r} has no {WEIGHTS} or {INDEX}"
                                + (f"; only safetensors are loaded, not {others}" if others else ""))
    state = {}
    for name in files:
        state.update(_load(folder / name))
    return config, state, read_padding(folder)


def read_padding(folder: Path) -> StateDict:
    """The Megatron vocabulary padding rows kept in `folder` ({} when it has none)."""
    path = Path(folder) / PADDING
    return _load(path) if path.is_file() else {}


def _load(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"weights file {str(path)!r} is corrupt or truncated: {e}") from e
