"""What a forward's attention_mask and position_ids may say (docs/HF.md, *What forward takes*).

Chunk boundaries count from a row's first real token, so a batch may start left-padded (each
row then at its own positions), a plain forward may be right-padded, and positions are each
row's own; anything else is refused here, naming what is wrong.
"""

from typing import List, Optional

import torch


def row_pads(attention_mask, n: int, cache, use_cache: bool) -> Optional[List[int]]:
    """The padding of each row when the batch starts left-padded (see SpiralModel), else None.

    Accepted: no mask or an all-ones mask; left padding (0...0 1...1 per row) when the batch
    starts (no cache, or an empty one); right padding (1...1 0...0) in a plain forward without a
    cache. The mask covers the new tokens, or the cached ones and the new ones; after a start,
    the new tokens must all be real.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    start = cache is None or cache.seen == 0
    if attention_mask.shape[1] != (n if start else cache.seen + n) and attention_mask.shape[1] != n:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns for {n} new tokens"
                         + ("" if start else f" after {cache.seen} cached ones"))
    if not start:
        if bool(attention_mask[:, -n:].all()):
            return None
        raise ValueError("SpiralFormer: tokens after the start of a batch must all be real (attention_mask 1)")
    mask = attention_mask.long()
    steps = mask.diff(dim=-1)
    if bool((steps >= 0).all()):  # 0...0 1...1 per row
        if not bool(mask[:, -1].all()):
            raise ValueError("SpiralFormer: a row of the batch has no real token (attention_mask all 0)")
        return (mask.shape[1] - mask.sum(dim=1)).tolist()
    if cache is None and not use_cache and bool((steps <= 0).all()):  # 1...1 0...0: right padding
        return None
    raise ValueError(
        "SpiralFormer: attention_mask must be left padding (0...0 1...1 per row) at the start of a "
        "batch, or right padding in a plain forward with use_cache=False; padding in the middle of a row or "
        "added to a running cache is not supported (chunk boundaries count from a row's first real token)."
    )


def right_aligned(x: torch.Tensor, lengths: List[int], width: int, dim: int) -> torch.Tensor:
    """The left-padded layout of per-row entries: row r's first lengths[r] entries along `dim`
    of x [b, ..] as the last lengths[r] of `width`, zeros in front (at the row's padding)."""
    src = (torch.arange(width, device=x.device)
           - torch.tensor([width - n for n in lengths], device=x.device)[:, None])  # [b, width]: x's entry, < 0 at padding
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = width
    index = src.clamp(min=0).view(shape).expand(*x.shape[:dim], width, *x.shape[dim + 1 :])
    return torch.where((src >= 0).view(shape), x.gather(dim, index), torch.zeros((), dtype=x.dtype, device=x.device))


def check_positions(position_ids: torch.Tensor, cache, pads: Optional[List[int]],
                     n: int) -> None:
    """position_ids [b|1, n] must be each real token's position counted from its row's first
    real token (what `generate` derives from the attention mask); the model uses no others."""
    new = torch.arange(n, device=position_ids.device)
    if pads is not None:  # a left-padded start: row r's real tokens are its last n - pads[r]
        pad = torch.tensor(pads, device=new.device)[:, None]
        want, real = new - pad, new >= pad  # [b, n]
    elif cache is not None and cache.lengths is not None:  # each row at its own position
        want, real = torch.tensor(cache.lengths, device=new.device)[:, None] + new, None
    else:
        want, real = (cache.seen if cache is not None else 0) + new, None
    wrong = position_ids != want
    if bool((wrong & real if real is not None else wrong).any()):
        raise ValueError(f"position_ids {position_ids.tolist()} are not the tokens' positions {want.tolist()} "
                         "(counted from each row's first real token): SpiralFormer takes no other positions")
