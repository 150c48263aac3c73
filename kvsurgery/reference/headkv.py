"""HeadKV's per-head budgets (arXiv 2410.19258; docs/headkv.md): head-importance shares and the budget formula."""

from __future__ import annotations

import torch

from kvsurgery.errors import CalibrationError


def kv_head_importance(scores: torch.Tensor, n_kv_heads: int, temp: float = 1.0) -> torch.Tensor:
    """[L, H] raw query-head scores -> [L, H_kv] shares summing to 1: normalise, raise to `temp`, normalise (as
    the reference loader), then sum each KV head's query group (query head h reads KV head h // (H / H_kv))."""
    s = scores.double()
    if not torch.isfinite(s).all() or (s < 0).any() or s.sum() <= 0:
        raise CalibrationError(
            "the head-importance scores are all zero (or invalid): no head ever attended to the needle in the "
            "calibration; recalibrate with more or shorter needle tests"
        )
    s = s / s.sum()
    s = s**temp
    s = s / s.sum()
    n_layers, n_heads = s.shape
    return s.reshape(n_layers, n_kv_heads, n_heads // n_kv_heads).sum(-1)


def head_caps(importance: torch.Tensor, base: int, beta: float) -> list[list[int]]:
    """HeadKV's budget formula (docs/headkv.md): tokens each head selects beyond the always-kept window.

    base = budget - window; pool = floor(base / beta) * n_heads_total is shared in proportion to importance;
    every head gets min_num = base - floor(base / beta). A larger beta gives a smaller pool (more uniform caps).
    """
    shared = base // beta  # python floor division on a float beta, as the reference code
    pool = shared * importance.numel()
    min_num = base - shared
    return [[round(float(x) * pool + min_num) for x in row] for row in importance]


def redistribute_overflow(caps: list[list[int]], limit: int, importance: torch.Tensor) -> list[list[int]]:
    """Optional, not in the paper (docs/headkv.md): caps above `limit` (the tokens a head can select) are cut to it and
    the excess goes to the heads below it in proportion to their importance, repeatedly, until it is spent or every
    head is full. The total is kept (up to `limit` per head); a head's cap never shrinks below min(cap, limit)."""
    flat = torch.tensor(caps, dtype=torch.int64).flatten()
    weight = importance.flatten().double()
    total = min(int(flat.sum()), limit * flat.numel())
    flat = flat.clamp(max=limit)
    while (left := total - int(flat.sum())) > 0:
        room = flat < limit
        w = torch.where(room, weight, 0.0)
        w = w if w.sum() > 0 else room.double()  # only zero-importance heads have room: share evenly
        share = w / w.sum() * left
        add = share.floor().long()
        rest = left - int(add.sum())  # whole units still owed: to the largest remainders (all on heads with room)
        add[(share - add).argsort(descending=True)[:rest]] += 1
        flat = (flat + add).clamp(max=limit)
    return flat.reshape(len(caps), -1).tolist()
