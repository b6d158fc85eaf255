"""Perplexity of a causal LM over fixed token sequences (see analysis.data).

The loss is the mean next-token cross-entropy over every label of every sequence (token
weighted), in float32; perplexity = exp(loss).
"""

import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def text_progress(total: int, stream=None) -> Callable[[int, int, float, int], None]:
    """A progress callback: a bar of sequences (analysis.progress) with the loss so far and
    tokens/s; plain lines when `stream` is not a terminal."""
    from spiral_megatron.analysis.progress import bar

    started, shown = time.time(), bar(total, "seq", stream, desc="scoring")

    def report(done: int, total: int, loss: float, tokens: int) -> None:
        rate = tokens / max(time.time() - started, 1e-9)
        shown.set_postfix_str(f"loss {loss:.4f}, {rate:,.0f} tokens/s", refresh=False)
        shown.update(done - shown.n)
        if done == total:
            shown.close()

    return report


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch_size: int = 8,
               progress: Optional[Callable[[int, int, float, int], None]] = None) -> dict:
    """rows [n, seq_length + 1] -> {"loss", "perplexity", "tokens", "sequences", "seq_length"}.

    `model(input_ids)` must return an object with `.logits` [b, s, V] (an HF causal LM); the
    rows go to its device, the loss is computed in float32."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size].to(device)
        inputs, labels = batch[:, :-1], batch[:, 1:]  # [b, s]
        logits = model(inputs, use_cache=False).logits.float()  # [b, s, V]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
        count += labels.numel()
        if progress is not None:
            progress(start + batch.shape[0], rows.shape[0], total / count, count)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "sequences": rows.shape[0],
            "seq_length": rows.shape[1] - 1}
