"""Logged numbers: throughput, TFLOP/s and MFU (spiral_megatron.config.flops), memory; console,
`--log-json` (one JSON object per logged step) and TensorBoard. Rank 0 writes. A write to a
log file that fails (a full disk) is recorded in `failure`, once, and that file is written no
more: the run then stops, saving first (trainer.Trainer.stop_if_log_failed)."""

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

from spiral_megatron.config import flops
from spiral_megatron.errors import space_left

# Dense bf16 peak TFLOP/s per GPU (vendor data sheets), matched against the device name.
PEAK_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def device_peak_tflops(override: Optional[float]) -> Optional[float]:
    """`override`, else the GPU's peak from PEAK_TFLOPS, else None (CPU: MFU not reported)."""
    if override is not None or not torch.cuda.is_available():
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def memory_gib() -> float:
    """Peak allocated GPU memory, or this process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def tensorboard_writer(folder: Optional[str]):
    """A SummaryWriter, or None; a clear ImportError when tensorboard is missing."""
    return None if folder is None else summary_writer_class(folder)(log_dir=folder)


def summary_writer_class(folder: str):
    """torch's SummaryWriter (which needs the `tensorboard` package), checked before a run
    starts without writing into `folder` (a writer opens an event file at once)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(f"tensorboard_dir {folder!r} needs the `tensorboard` package "
                          "(pip install tensorboard)") from None
    return SummaryWriter


class Logger:
    """Accumulates training-step time between logs (evaluation and saving excluded) and writes
    each logged step everywhere."""

    def __init__(self, model_config, seq_length: int, vocab_size: int, global_batch_size: int,
                 world_size: int, peak_tflops: Optional[float], log_json: Optional[str],
                 tensorboard_dir: Optional[str], rank0: bool):
        self.rank0, self.world_size, self.peak = rank0, world_size, peak_tflops
        self.seq_length, self.tokens_per_step = seq_length, global_batch_size * seq_length
        self.flops_per_step = flops.training_flops(model_config, seq_length, vocab_size) * global_batch_size
        if rank0 and log_json:
            Path(log_json).parent.mkdir(parents=True, exist_ok=True)  # as a --tensorboard-dir is made
        self.json = open(log_json, "a") if rank0 and log_json else None
        self.tb = tensorboard_writer(tensorboard_dir) if rank0 else None
        self.paths = {"json": log_json, "tb": tensorboard_dir}
        self.failure: Optional[str] = None  # the first failed write to a log file, in words
        self.tty = rank0 and sys.stdout.isatty()
        self.train_time, self.steps, self.total = 0.0, 0, None

    def step_done(self, iteration: int, total: int, seconds: float) -> None:
        self.steps += 1
        self.train_time += seconds
        self.total = total
        if self.tty:
            sys.stdout.write(f"\r  step {iteration}/{total}")
            sys.stdout.flush()

    def log(self, iteration: int, consumed_samples: int, stats: Dict[str, float],
            val_loss: Optional[float] = None) -> Dict:
        elapsed = max(self.train_time, 1e-9) / max(self.steps, 1)
        tflops = self.flops_per_step / elapsed / self.world_size / 1e12
        record = {
            "iteration": iteration, "end_iteration": self.total,
            "consumed_tokens": consumed_samples * self.seq_length,
            "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
            "tokens_per_sec": self.tokens_per_step / elapsed, "tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "step_time_s": elapsed, "memory_gib": memory_gib(),
            # the mean step since the last log line, times the steps left (evaluation and saving excluded)
            "eta_s": elapsed * (self.total - iteration) if self.total else None,
        }
        if stats.get("loss_scale") is not None:  # fp16, as Megatron-LM logs it
            record.update(loss_scale=stats["loss_scale"], skipped_iterations=stats.get("skipped_iterations", 0))
        for key in ("params_norm", "num_zeros"):  # --log-params-norm, --log-num-zeros-in-grad
            if stats.get(key) is not None:
                record[key] = stats[key]
        if val_loss is not None:
            record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
        self.train_time, self.steps = 0.0, 0
        self.write(record)
        return record

    def log_eval(self, iteration: int, val_loss: float) -> None:
        self.write({"iteration": iteration, "val_loss": val_loss,
                    "val_ppl": math.exp(min(val_loss, 50.0))})

    def write(self, record: Dict) -> None:
        if not self.rank0:
            return
        print(("\r" if self.tty else "") + format_record(record), flush=True)
        with self._sink("json", record["iteration"]):
            if self.json:
                self.json.write(json.dumps(record) + "\n")
                self.json.flush()
        with self._sink("tb", record["iteration"]):
            if self.tb:
                for key, value in record.items():
                    if key != "iteration" and isinstance(value, (int, float)):
                        self.tb.add_scalar(key, value, record["iteration"])
                self.tb.flush()

    @contextlib.contextmanager
    def _sink(self, name: str, iteration: Optional[int]):
        """Writing to one log file: an OSError (a full disk) is recorded, said once on the
        console, and that file is closed and written no more."""
        try:
            yield
        except OSError as e:
            path = self.paths[name]
            where = f"at iteration {iteration}" if iteration is not None else "at its close"
            failure = (f"writing {'--log-json' if name == 'json' else '--tensorboard-dir'} {path} failed {where} "
                       f"({type(e).__name__}: {e}); {space_left(Path(path).parent)}")
            self.failure = self.failure or failure
            print(f"pretrain_spiral: {failure}: the run stops, saving first", flush=True)
            with contextlib.suppress(OSError):
                getattr(self, name).close()
            setattr(self, name, None)

    def close(self) -> None:
        with self._sink("json", None):
            if self.json:
                self.json.close()
        with self._sink("tb", None):
            if self.tb:
                self.tb.close()


def duration(seconds: float) -> str:
    """1h02m, 1m40s or 12s, as a progress line's ETA."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_record(r: Dict) -> str:
    """`iteration 120/300 | ... | ETA 1m40s`, as Megatron-LM's and NeMo's progress lines."""
    if "loss" not in r:
        return f" validation at iteration {r['iteration']} | val loss {r['val_loss']:.4f} | val ppl {r['val_ppl']:.2f}"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    norm = f"{r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "n/a"
    total = f"/{r['end_iteration']}" if r.get("end_iteration") else ""
    line = (f" iteration {r['iteration']:>6}{total} | tokens {r['consumed_tokens']:>10} | loss {r['loss']:.4f} | "
            f"lr {r['lr']:.3e} | grad norm {norm} | tokens/s {r['tokens_per_sec']:,.0f} | "
            f"TFLOP/s {r['tflops']:.3f} | MFU {mfu} | mem {r['memory_gib']:.2f} GiB")
    if "loss_scale" in r:
        line += f" | loss scale {r['loss_scale']:g} | skipped {r['skipped_iterations']}"
    if "params_norm" in r:
        line += f" | params norm {r['params_norm']:.3f}"
    if "num_zeros" in r:
        line += f" | num zeros {r['num_zeros']:.0f}"
    if "val_loss" in r:
        line += f" | val loss {r['val_loss']:.4f} | val ppl {r['val_ppl']:.2f}"
    if r.get("eta_s") is not None:
        line += f" | ETA {duration(r['eta_s'])}"
    return line
