"""CSP, Cross-Self KV cache pruning for vision-language models (Pei et al., 2024, arXiv 2412.04652; docs/csp.md):
the reference math of `kvsurgery.ops.csp`.

The attention of the last `window` prompt queries (n-softmax) is split into intra-modality ("self": query and key
both text or both visual) and inter-modality ("cross") parts, summed over those queries per key. A KV head keeps its
window, the top k_self tokens by self score and then the top k_cross of the *remaining* tokens by cross score, so no
token is taken twice (the reference code concatenates both top-k lists and can keep a token twice; docs/csp.md,
"Deviations from the reference code"); what a list cannot fill (too few tokens with any score of its kind) is
backfilled by total score.
GQA: scores are averaged over each KV head's query group (the project convention).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery.reference.core import NEG_INF, forced_keep, valid_keys, window_logits


def n_softmax(logits: Tensor, n: int = 1) -> Tensor:
    """softmax_n(x)_i = exp(x_i) / (n + sum_j exp(x_j)) along the last dim, computed stably as an ordinary softmax
    with n zero logits appended (then dropped). Rows sum to less than 1 when n > 0; a fully masked row is all 0."""
    if n == 0:
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)
    pad = logits.new_zeros((*logits.shape[:-1], n))
    return torch.softmax(torch.cat([logits, pad], dim=-1), dim=-1)[..., : logits.shape[-1]]


def csp_scores(
    q: Tensor, k: Tensor, mask: Tensor | None, is_visual: Tensor, scale: float, window: int, n: int
) -> tuple[Tensor, Tensor]:
    """(self, cross) scores [B, Hkv, T]: n-softmax attention of the last `window` queries, summed over those queries
    where the query's modality equals (self) or differs from (cross) the key's, averaged over the GQA group."""
    t = q.shape[2]
    w = min(window, t)
    probs = n_softmax(window_logits(q, k, mask, scale, window), n)
    vis = is_visual.bool().to(q.device)
    same = (vis[:, t - w :, None] == vis[:, None, :])[:, None, None]  # [B, 1, 1, W, T]
    s_self = torch.where(same, probs, 0.0).sum(3).mean(2)
    s_cross = torch.where(same, 0.0, probs).sum(3).mean(2)
    return s_self.float(), s_cross.float()


def _top(score: Tensor, allowed: Tensor, count: Tensor) -> Tensor:
    """bool [B, Hkv, T]: the `count` [B, Hkv] highest-scored allowed tokens (ties: lower index first)."""
    order = torch.sort(score.masked_fill(~allowed, NEG_INF), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return allowed & (rank < count[..., None])


def csp_select(
    s_self: Tensor, s_cross: Tensor, candidate: Tensor, n_select: Tensor, cross_ratio: float
) -> tuple[Tensor, Tensor]:
    """(self picks, cross picks) bool [B, Hkv, T], disjoint: k_cross = floor(n * cross_ratio) and k_self = n - k_cross
    of the `n_select` [B, Hkv] tokens each KV head chooses among `candidate` [B, T] tokens. A list only takes tokens
    with a positive score of its kind; the quota left over is the backfill (see `csp_priority`)."""
    k_cross = torch.floor(n_select.double() * cross_ratio).long()
    k_self = n_select.long() - k_cross
    cand = candidate[:, None].expand_as(s_self)
    self_pick = _top(s_self, cand & (s_self > 0), k_self)
    cross_pick = _top(s_cross, cand & (s_cross > 0) & ~self_pick, k_cross)
    return self_pick, cross_pick


def csp_priority(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    is_visual: Tensor,
    keep: Tensor,
    scale: float,
    window: int,
    cross_ratio: float,
    n: int,
) -> Tensor:
    """Priority scores [B, Hkv, T] whose top `keep` (with the window forced in) is the CSP selection.

    Picked tokens score 2 + their total score / (window + 1), others their total score / (window + 1) in [0, 1):
    `select_compact_` then keeps the window, every pick, and backfills by total score.
    """
    b, _, t, _ = k.shape
    s_self, s_cross = csp_scores(q, k, mask, is_visual, scale, window, n)
    valid = valid_keys(mask, t, b).to(k.device)
    forced = forced_keep(valid, 0, window)
    n_select = (keep.long() - forced.sum(-1, keepdim=True)).clamp_min(0)
    self_pick, cross_pick = csp_select(s_self, s_cross, valid & ~forced, n_select, cross_ratio)
    total = (s_self + s_cross) / (min(window, t) + 1)
    return torch.where(self_pick | cross_pick, total + 2.0, total)
