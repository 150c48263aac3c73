"""H2O's token scores (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"): the
attention each key receives summed over every prompt query. Reference of the `score_accumulated` op."""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery.reference.core import NEG_INF, acc_dtype, allowed_keys, group_queries


def accumulated_scores(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, chunk: int = 256) -> Tensor:
    """H2O scores [B, Hkv, T]: attention each key receives summed over all prompt queries (mean over GQA group)."""
    b, _, t, _ = q.shape
    n_kv = k.shape[1]
    dt = acc_dtype(q)
    total = torch.zeros(b, n_kv, t, dtype=dt, device=q.device)
    kk = k.to(dt)
    for r0 in range(0, t, chunk):
        r1 = min(t, r0 + chunk)
        qc = group_queries(q[:, :, r0:r1], n_kv).to(dt)
        logits = torch.einsum("bhgrd,bhtd->bhgrt", qc, kk) * scale
        allowed = allowed_keys(mask, r0, r1, t, b).to(q.device)
        logits = logits.masked_fill(~allowed[:, None, None], NEG_INF)
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        total += probs.sum(dim=3).mean(dim=2)
    return total.float()
