"""CSP's op (`torch.ops.kvsurgery.score_csp`), backed by `kvsurgery.reference.csp`."""

from __future__ import annotations

from kvsurgery.ops.schema import OpDef, token_scores
from kvsurgery.reference import csp as crossmodal

OPS = (
    # Priority scores [B, Hkv, T] (self/cross budgets, deduplicated) for `select_compact_`.
    OpDef(
        "score_csp",
        (
            "Tensor q",
            "Tensor k",
            "Tensor? mask",
            "Tensor is_visual",
            "Tensor keep",
            "float scale",
            "int window",
            "float cross_ratio",
            "int n",
        ),
        crossmodal.csp_priority,
        token_scores,
        "Tensor",
    ),
)
