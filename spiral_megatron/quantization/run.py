"""What tools/quantize.py does: load a checkpoint, measure PTQ formats, save a quantized one.

One process, CPU or one GPU: the checkpoint is read as full tensors whatever TP/PP layout
saved it (conversion/megatron_io.py) into a TP1 model. Calibration takes validation samples
[0, N) of the job's data (config.yaml of the checkpoint), evaluation the next E samples
[N, N + E): calibration and evaluation never share a sample.
"""

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from spiral_megatron.errors import ConfigError
from spiral_megatron.quantization import checkpoint, ptq
from spiral_megatron.quantization.formats import quantizes_activations


@dataclass
class Source:
    """A checkpoint read for quantization: the architecture, its full weights, where it is."""

    folder: Path
    iteration: int
    args: object
    tensors: Dict[str, torch.Tensor]


def read_source(load: str, iteration: Optional[int] = None) -> Source:
    from spiral_megatron.conversion import mapping, megatron_io

    folder, iteration = megatron_io.find_checkpoint(load, iteration)
    if checkpoint.read_recipe(folder) is not None:
        raise ValueError(f"{str(folder)!r} is already quantized ({checkpoint.RECIPE_FILE}); "
                         "quantize the unquantized checkpoint")
    tensors = mapping.normalize_megatron(megatron_io.read_tensors(folder))  # per-layer local names
    return Source(folder, iteration, megatron_io.read_model_args(folder), tensors)


def build(source: Source, device: str = "cpu") -> torch.nn.Module:
    """A fresh TP1 model with the checkpoint's weights, in eval mode."""
    from spiral_megatron.conversion.megatron_io import build_megatron

    model = build_megatron(source.args)
    missing, unexpected = model.load_state_dict(source.tensors, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit its model_args.json: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


class TooFewSamples(ConfigError):
    """The validation data holds fewer samples than asked for (Megatron would repeat them)."""


def validation_batches(folder: Path, num_samples: int, micro_batch: int) -> List[Dict[str, torch.Tensor]]:
    """The first `num_samples` validation samples of the job's data, as [b, s] batches, each
    sample once: TooFewSamples when the validation data holds fewer (Megatron would repeat them)."""
    from spiral_megatron.job.data import datasets as data
    from spiral_megatron.job.data import dataset_check
    from spiral_megatron.job.settings.resolve import resolve

    job = resolve(["--config", str(folder / "config.yaml")])
    settings = dataclasses.replace(job.data, evaluate=True, train_samples=1, valid_samples=num_samples)
    source = data.resolve(settings, build_default=True)
    tokenizer = data.load_tokenizer(source, settings.vocab_size)
    split = data.check(settings, source, tokenizer)
    blend = source.valid if source.whole else source.train  # None: mock data, never repeats
    if blend is not None:
        corpora = [dataset_check.open_corpus(prefix, tokenizer) for prefix in blend[0]]
        parts = None if source.whole else split
        seq = settings.seq_length
        times = dataset_check.epochs(corpora, blend[1], parts, num_samples, seq, part=1)
        if max(times) > 1:
            fits = (f"{(dataset_check.part_tokens(corpora[0], parts, 1) - 1) // seq}" if len(corpora) == 1
                    else f"about {int(num_samples / max(times))} in the blend's proportions")
            where = ", ".join(blend[0]) + ("" if source.whole else f" (split {split})")
            raise TooFewSamples(f"{num_samples} validation samples of {seq} tokens would repeat samples: the "
                                f"validation data of {where} holds {fits}")
    _, valid = data.build_datasets(settings, source, tokenizer, split)
    samples = [valid[i] for i in range(num_samples)]
    return [data._collate(samples[i:i + micro_batch]) for i in range(0, num_samples, micro_batch)]


def _inputs(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def val_loss(model: torch.nn.Module, batches) -> float:
    """Mean loss over the unmasked tokens of `batches`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for batch in batches:
        b = _inputs(batch, device)
        losses = model(b["tokens"], b["position_ids"], None, labels=b["labels"])  # [b, s]
        mask = b["loss_mask"].float()
        total += (losses.float() * mask).sum().item()
        count += mask.sum().item()
    return total / max(count, 1.0)


def forward_loop(batches, log: Callable[[str], None] = print) -> Callable:
    """modelopt's calibration callback over `batches`, reporting progress."""
    def run(model):
        device = next(model.parameters()).device
        started = time.time()
        with torch.no_grad():
            for i, batch in enumerate(batches, 1):
                b = _inputs(batch, device)
                model(b["tokens"], b["position_ids"], None)
                log(f"  calibration batch {i}/{len(batches)} ({time.time() - started:.1f}s)")
    return run


@dataclass
class Result:
    format: str
    scales: str
    val_loss_before: float
    val_loss_after: float
    seconds: float
    rel_change: float = field(init=False)

    def __post_init__(self):
        self.rel_change = (self.val_loss_after - self.val_loss_before) / self.val_loss_before


def variants(formats: List[str], scales: List[str]) -> List[tuple]:
    """(format, scales) pairs; per-level only where the format quantizes activations."""
    return [(f, s) for f in formats for s in scales if s == "shared" or quantizes_activations(f)]


def measure(source: Source, formats: List[str], scales: List[str], calib, evals, device="cpu",
            log: Callable[[str], None] = print, keep: bool = False):
    """Results of every variant; with `keep`, also the last quantized model."""
    before = val_loss(build(source, device), evals)
    log(f"val loss before quantization: {before:.4f} ({sum(len(b['tokens']) for b in evals)} samples)")
    results, model = [], None
    for fmt, scale in variants(formats, scales):
        log(f"{fmt} ({scale} scales): calibrating on {sum(len(b['tokens']) for b in calib)} samples")
        started = time.time()
        model = ptq.quantize(build(source, device), fmt, forward_loop(calib, log), per_level=scale == "per-level")
        seconds = time.time() - started
        results.append(Result(fmt, scale, before, val_loss(model, evals), seconds))
        log(f"{fmt} ({scale} scales): val loss {results[-1].val_loss_after:.4f}")
    return results, (model if keep else None)


def table(results: List[Result]) -> str:
    lines = ["| format | scales | val loss before | val loss after | relative change | time (s) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.format} | {r.scales} | {r.val_loss_before:.4f} | {r.val_loss_after:.4f} | "
                     f"{100 * r.rel_change:+.3f}% | {r.seconds:.1f} |")
    return "\n".join(lines)


def save(model: torch.nn.Module, source: Source, recipe: ptq.QuantRecipe, save_dir: str, force: bool) -> Path:
    """A model-only checkpoint in the training job's layout (what `--load` reads for QAT):
    the quantized model's dist checkpoint, modelopt state, recipe and the source's side files,
    written into a staging folder and published as the job's saves are (checkpoint_files)."""
    from spiral_megatron.job.checkpoint import checkpoint_files

    def write_files(staging: Path) -> None:
        checkpoint.save_state(model, staging, recipe)
        for name in ("model_args.json", "config.yaml", "tokenizer"):
            src = source.folder / name
            if src.is_dir():
                shutil.copytree(src, staging / name)
            elif src.is_file():
                shutil.copy(src, staging / name)

    return checkpoint_files.write_model_only(save_dir, source.iteration, model, write_files, force)


def write_json(results: List[Result], path: str) -> None:
    Path(path).write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
