"""StreamingLLM's token scores (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks"):
recency, so top-k keeps the newest tokens beside the sinks. Reference of the `score_recency` op."""

from __future__ import annotations

import torch
from torch import Tensor


def recency_scores(k: Tensor) -> Tensor:
    """StreamingLLM scores [B, Hkv, T]: the token index, so top-k keeps the most recent tokens."""
    b, n_kv, t, _ = k.shape
    return torch.arange(t, dtype=torch.float32, device=k.device).expand(b, n_kv, t).contiguous()
