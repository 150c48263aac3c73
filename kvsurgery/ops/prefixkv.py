"""PrefixKV's custom ops (`torch.ops.kvsurgery.prefixkv_*`); their specification is `kvsurgery.prefixkv_reference`.

`prefixkv_append_` is PrefixKV's own decode step (append + fixed-point anchor eviction). It is a separate op
rather than a policy of the core `append_`, whose eviction picks victims by score or age, not by cache index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery import prefixkv_reference as reference
from kvsurgery.ops.core import STORE_MUTATES


@torch.library.custom_op("kvsurgery::prefixkv_scores", mutates_args=())
def prefixkv_scores(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Layer-level accumulated attention [B, Hkv, T] (the same row for every KV head)."""
    return reference.layer_scores(q, k, mask, scale)


@prefixkv_scores.register_fake
def _(q, k, mask, scale):
    b, n_kv, t, _ = k.shape
    return k.new_empty((b, n_kv, t), dtype=torch.float32)


@torch.library.custom_op("kvsurgery::prefixkv_append_", mutates_args=STORE_MUTATES)
def prefixkv_append_(
    k_store: Tensor,
    v_store: Tensor,
    pos: Tensor,
    slot_score: Tensor,
    keep: Tensor,
    cap: Tensor,
    start: Tensor,
    length: Tensor,
    seen: Tensor,
    k: Tensor,
    v: Tensor,
    ratio: float,
    distance: int,
) -> None:
    """Decode: append one token per (row, KV head); delete the anchor token when the layer holds over 1 - ratio."""
    reference.append_anchor_(k_store, v_store, pos, slot_score, keep, cap, start, length, seen, k, v, ratio, distance)


@prefixkv_append_.register_fake
def _(k_store, v_store, pos, slot_score, keep, cap, start, length, seen, k, v, ratio, distance):
    return None
