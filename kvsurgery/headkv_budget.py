"""HeadKV's per-head budgets (seed-algorithms section 1.2): head-importance shares and the budget formula."""

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
    """HeadKV's budget formula (section 1.2): tokens each head selects beyond the always-kept window.

    base = budget - window; pool = floor(base / beta) * n_heads_total is shared in proportion to importance;
    every head gets min_num = base - floor(base / beta). A larger beta gives a smaller pool (more uniform caps).
    """
    shared = base // beta  # python floor division on a float beta, as the reference code
    pool = shared * importance.numel()
    min_num = base - shared
    return [[round(float(x) * pool + min_num) for x in row] for row in importance]
