"""An HF SpiralFormer (spiral_megatron.hf) to analyse, from either kind of folder.

- a converted Hugging Face folder (config.json + safetensors): loaded with its own shipped code;
- a training checkpoint folder (latest_checkpointed_iteration.txt, any TP/PP layout): its full
  tensors are read in one process and mapped with the converter's name table
  (spiral_megatron.conversion), in memory, into the package's HF model.
Both give the same model as `tools/convert_to_hf.py` followed by loading the folder, so every
statistic computed here is the same from a checkpoint and from its conversion.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


@dataclass
class Loaded:
    """The model (eval mode, float32, CPU), where its tokenizer lives, and where it came from."""

    model: torch.nn.Module
    tokenizer_dir: Optional[Path]
    source: str
    kind: str  # "hf" or "megatron"


def is_hf_folder(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


def load(path: str, iteration: Optional[int] = None) -> Loaded:
    """The HF model of a converted folder or of a Megatron checkpoint folder."""
    if is_hf_folder(path):
        if iteration is not None:
            raise ValueError(f"iteration {iteration} given, but {path!r} is a Hugging Face folder (one model)")
        from spiral_megatron.conversion.convert import load_hf

        tok = Path(path) if (Path(path) / "tokenizer.json").is_file() else None
        return Loaded(load_hf(Path(path)), tok, str(path), "hf")
    return _from_megatron(path, iteration)


def _from_megatron(load_dir: str, iteration: Optional[int]) -> Loaded:
    """Checkpoint -> HF model in memory (the steps of convert.megatron_to_hf_folder, no folder)."""
    from spiral_megatron.conversion import convert, hf_config, mapping, megatron_io
    from spiral_megatron.hf.modeling_spiral import SpiralForCausalLM

    folder, _ = megatron_io.find_checkpoint(load_dir, iteration)
    args = megatron_io.read_model_args(folder)
    hf_config.check_expressible(args)
    tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
    config = hf_config.to_hf_config(args, **convert.tokenizer_info(tok_dir))
    source = mapping.normalize_megatron(megatron_io.read_tensors(folder))
    state = mapping.megatron_to_hf(source, hf_config.shapes_of(config), config.tie_word_embeddings)
    mapping.check_coverage(state, convert.expected_hf_shapes(config), "Hugging Face")
    model = SpiralForCausalLM(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit the HF model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return Loaded(model.float().eval(), tok_dir, f"{folder}", "megatron")


def placed(model: torch.nn.Module, device: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """(model on `device` in `dtype`, the device's name): by default a GPU when there is one. A
    device this machine lacks is a ValueError naming it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return model.to(device=device, dtype=dtype), device
    except (RuntimeError, AssertionError) as e:  # torch: RuntimeError; a build without CUDA: AssertionError
        raise ValueError(f"--device {device!r}: {str(e).splitlines()[0]}") from None


def load_tokenizer(loaded: Loaded, override: Optional[str] = None):
    """spiral_megatron's Tokenizer (with its eod id) of the model, or of `override`."""
    from spiral_megatron.job.data.tokenizer import Tokenizer

    where = override or loaded.tokenizer_dir
    if where is None:
        raise ValueError(f"{loaded.source!r} holds no tokenizer; pass --tokenizer DIR (or use an indexed dataset)")
    return Tokenizer.load(where)


def load_with_sequences(model: str, data_paths, iteration: Optional[int] = None, tokenizer: Optional[str] = None,
                        seq_length: Optional[int] = None, max_sequences: Optional[int] = None,
                        text_key: str = "text"):
    """(Loaded, rows [n, seq + 1], seq): what tools/evaluate.py and tools/probe.py start from.
    The tokenizer is needed only for text/JSONL files; seq defaults to the model's maximum."""
    from spiral_megatron.analysis import data

    loaded = load(model, iteration)
    needs_tok = any(not data.is_indexed_prefix(p) for p in data_paths)
    tok = load_tokenizer(loaded, tokenizer) if needs_tok else None
    seq = seq_length or loaded.model.config.max_position_embeddings
    rows = data.sequences(data.token_documents(data_paths, tok, text_key), seq, max_sequences)
    return loaded, rows, seq


def add_source_arguments(parser) -> None:
    """--model, --iteration, --data, --tokenizer, --json-keys, --seq-length (both CLI tools)."""
    parser.add_argument("--model", required=True, help="checkpoint folder (any TP/PP layout) or converted HF folder")
    parser.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    parser.add_argument("--data", nargs="+", required=True, help="indexed dataset prefixes, .jsonl or .txt files")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--json-keys", "--json-key", "--text-key", dest="text_key", default="text", metavar="KEY",
                        help="JSONL key holding the text (tools/preprocess_data.py's and Megatron-LM's name; "
                             "--json-key and --text-key are aliases)")
    parser.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default: the model's maximum)")
