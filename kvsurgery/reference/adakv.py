"""Ada-KV's per-head budgets (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation"): one layer's budget shared among its KV heads by a global top-k over their scores. Reference of the
`budget_adakv` op."""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery.reference.core import NEG_INF, forced_keep, largest_remainder, top_indices, valid_keys


def adakv_budgets(
    scores: Tensor, mask: Tensor | None, keep: Tensor, sinks: int, window: int, floor: float, normalize: bool
) -> Tensor:
    """Ada-KV per-head budgets [B, Hkv] (int32, each including sinks + window); each row keeps its planned total.

    Per row, the planned `keep` fixes the layer's total; its selectable part b = budget - sinks - window per
    head is shared across the layer's KV heads: a global top (Hkv * b) over all heads decides each head's
    share, then a floor of `floor * b` is mixed in.
    """
    valid = valid_keys(mask, scores.shape[-1], scores.shape[0]).to(scores.device)
    rows = [_adakv_row(scores[b], valid[b], keep[b], sinks, window, floor, normalize) for b in range(scores.shape[0])]
    return torch.stack(rows).to(torch.int32)


def _adakv_row(scores, valid, keep, sinks, window, floor, normalize) -> Tensor:
    n_kv, t = scores.shape
    budget = int(keep.sum()) // n_kv
    selectable = budget - sinks - window
    if selectable <= 0 or budget >= int(valid.sum()):
        return keep.clone()  # nothing to share: every head already keeps all it can
    candidate = valid & ~forced_keep(valid[None], sinks, window)[0]
    s = scores.float().masked_fill(~candidate, NEG_INF)
    if normalize:
        finite = s.masked_fill(~candidate, 0.0)
        top = finite.topk(min(selectable, t), dim=-1).values.sum(-1)
        s = s * (top / finite.sum(-1).clamp_min(1e-12))[:, None]
    picked = top_indices(s.reshape(-1), n_kv * selectable) // t
    counts = torch.bincount(picked, minlength=n_kv).float()
    mixed = floor * selectable + (1.0 - floor) * counts
    total = torch.tensor([float(n_kv * selectable)], device=scores.device)
    return largest_remainder(mixed[None], total)[0] + sinks + window
