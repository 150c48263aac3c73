"""SnapKV's op (`torch.ops.kvsurgery.score_window`): prefill token scores from the last `window` queries; its
specification is `kvsurgery.reference.snapkv`, its CUDA kernel `kvsurgery.kernels.snapkv_window`."""

from __future__ import annotations

from kvsurgery.ops.schema import SCORE_PARAMS, OpDef, token_scores
from kvsurgery.reference import snapkv as reference

OPS = (
    OpDef(
        "score_window",
        (*SCORE_PARAMS, "int window", "int kernel", "str pool"),
        reference.window_scores,
        token_scores,
        "Tensor",
    ),
)
