"""SnapKV's token scores (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"): the
attention the last `window` prompt queries pay each key, averaged over them and the GQA group, the prefix pooled
so that kept tokens come in clusters. Reference of the `score_window` op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvsurgery.reference.core import window_logits


def window_scores(
    q: Tensor, k: Tensor, mask: Tensor | None, scale: float, window: int, kernel: int, pool: str
) -> Tensor:
    """SnapKV scores [B, Hkv, T]: attention of the last `window` queries, averaged over them and the GQA group.

    The prefix (tokens before the window) is pooled with `kernel`; window tokens keep their raw score
    (they are always kept anyway).
    """
    probs = torch.softmax(window_logits(q, k, mask, scale, window), dim=-1).nan_to_num(0.0)
    return pool_prefix(probs.mean(dim=(2, 3)).float(), min(window, q.shape[2]), kernel, pool)


def pool_prefix(scores: Tensor, window: int, kernel: int, pool: str) -> Tensor:
    """SnapKV: pool the scores [..., T] of the tokens before the last `window`; window tokens keep theirs."""
    t = scores.shape[-1]
    prefix = pool1d(scores[..., : t - window], kernel, pool)
    return torch.cat([prefix, scores[..., t - window :]], dim=-1)


def pool1d(scores: Tensor, kernel: int, pool: str) -> Tensor:
    """Smooth scores along the token axis (SnapKV clustering): stride 1, same length."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pool == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    elif pool == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
    return out[..., : shape[-1]].reshape(shape)
