"""PrefixKV's ops (`torch.ops.kvsurgery.prefixkv_*`); their specification is `kvsurgery.reference.prefixkv`.

`prefixkv_append_` is PrefixKV's own decode step (append + fixed-point anchor eviction). It is a separate op
rather than a policy of the core `append_`, whose eviction picks victims by score or age, not by cache index.
"""

from __future__ import annotations

from kvsurgery.ops.schema import OpDef, token_scores
from kvsurgery.reference import prefixkv as reference
from kvsurgery.store import CORE_TENSORS

OPS = (
    # Layer-level accumulated attention [B, Hkv, T] (the same row for every KV head).
    OpDef(
        "prefixkv_scores",
        ("Tensor q", "Tensor k", "Tensor? mask", "float scale"),
        reference.layer_scores,
        token_scores,
        "Tensor",
    ),
    # Decode: append one token per (row, KV head); delete the anchor token when the layer holds over 1 - ratio.
    OpDef(
        "prefixkv_append_",
        (*CORE_TENSORS, "Tensor k", "Tensor v", "float ratio", "int distance"),
        reference.append_anchor_,
        writes=CORE_TENSORS,
    ),
)
