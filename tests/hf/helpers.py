"""Tiny Megatron models and checkpoints for the conversion tests (shared by pytest and torchrun)."""

import json
from pathlib import Path

import torch

from spiral_megatron.model.model_args import ModelArgs

BASE = dict(hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, num_prelude_layers=1,
            num_core_layers=2, num_coda_layers=1, chunk_sizes=[4, 2, 1], hidden_dropout=0.0,
            attention_dropout=0.0)
VOCAB, PADDED_VOCAB, SEQ = 50, 64, 64
# GQA (one group per TP rank) and a gated MLP: the layouts TP sharding could scramble
TP2_CONFIG = dict(num_query_groups=2, gated_linear_unit=True, chunk_offsets=[2, 1, 0], init_method_std=0.2)


def model_args(vocab_size: int = PADDED_VOCAB, tied: bool = False, rope: str = "rope", rotary_percent: float = 1.0,
               rotary_base: int = 10000, **config) -> ModelArgs:
    return ModelArgs(config={**BASE, **config}, vocab_size=vocab_size, max_sequence_length=SEQ,
                     share_embeddings_and_output_weights=tied, position_embedding_type=rope,
                     rotary_percent=rotary_percent, rotary_base=rotary_base)


def build(args: ModelArgs, seed: int = 0, std: float = 0.15):
    """A Megatron model with large random weights (the default 0.02 init makes logits ~0 and
    parity checks vacuous); norms keep weight ~1."""
    from spiral_megatron.model.model_args import build_model

    model = build_model(args, use_cpu_initialization=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, None)


def save_checkpoint(model, args: ModelArgs, save: Path, iteration: int = 200, tokenizer: bool = True) -> Path:
    """The training script's layout: SAVE/iter_NNNNNNN/{dist ckpt, model_args.json, tokenizer/}."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    folder = Path(save) / f"iter_{iteration:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(folder))
    if not dist.is_initialized() or dist.get_rank() == 0:
        args.save(folder / "model_args.json")
        if tokenizer:
            write_tokenizer(folder / "tokenizer")
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return folder


def write_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer of exactly `vocab_size` tokens (id 0 = <|endoftext|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>"] + [f"w{i}" for i in range(vocab_size - 2)] + ["[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
           "bos_token": "<|endoftext|>", "unk_token": "[UNK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
