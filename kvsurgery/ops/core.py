"""kvsurgery custom ops (`torch.ops.kvsurgery.*`): what the graph passes insert.

Each op has a fake implementation so Dynamo and Inductor can trace it with symbolic shapes, and a real
implementation that is the PyTorch reference (`kvsurgery.reference`); fused kernels plug in per device.
Mutating ops write the compressed store in place and return nothing, so Inductor re-inplaces them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery import reference
from kvsurgery.errors import SurgeryNotAppliedError

# The core store tensors, in the order the store ops take them (see kvsurgery.store.CORE_TENSORS).
STORE_MUTATES = ("k_store", "v_store", "pos", "slot_score", "keep", "cap", "start", "length", "seen")


@torch.library.custom_op("kvsurgery::kv_update", mutates_args=())
def kv_update(
    k: Tensor, v: Tensor, store: list[Tensor], names: str, layer_idx: int, prefill: bool
) -> tuple[Tensor, Tensor]:
    """Marker emitted by `KVStore.update`: the surgery pipeline replaces it. Running it means it did not.

    It carries the layer's store tensors and their comma-separated names, so passes can wire them into the
    ops they insert.
    """
    raise SurgeryNotAppliedError(
        f"attention layer {layer_idx} ran without the kvsurgery rewrite (the forward was not captured by Dynamo; "
        "is TORCHDYNAMO_DISABLE set, or was the model called through its class instead of the instance?). "
        "kvsurgery never falls back to uncompressed attention: call the model returned by kvsurgery.apply()."
    )


@kv_update.register_fake
def _(k, v, store, names, layer_idx, prefill):
    return k.new_empty(k.shape), v.new_empty(v.shape)


def _scores_like(k: Tensor) -> Tensor:
    b, n_kv, t, _ = k.shape
    return k.new_empty((b, n_kv, t), dtype=torch.float32)


@torch.library.custom_op("kvsurgery::score_window", mutates_args=())
def score_window(
    q: Tensor, k: Tensor, mask: Tensor | None, scale: float, window: int, kernel: int, pool: str
) -> Tensor:
    """SnapKV observation-window scores [B, Hkv, T]."""
    return reference.window_scores(q, k, mask, scale, window, kernel, pool)


@score_window.register_fake
def _(q, k, mask, scale, window, kernel, pool):
    return _scores_like(k)


@torch.library.custom_op("kvsurgery::score_accumulated", mutates_args=())
def score_accumulated(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """H2O accumulated-attention scores [B, Hkv, T]."""
    return reference.accumulated_scores(q, k, mask, scale)


@score_accumulated.register_fake
def _(q, k, mask, scale):
    return _scores_like(k)


@torch.library.custom_op("kvsurgery::score_recency", mutates_args=())
def score_recency(k: Tensor) -> Tensor:
    """StreamingLLM scores [B, Hkv, T]: the token index."""
    return reference.recency_scores(k)


@score_recency.register_fake
def _(k):
    return _scores_like(k)


@torch.library.custom_op("kvsurgery::budget_adakv", mutates_args=())
def budget_adakv(
    scores: Tensor, mask: Tensor | None, keep: Tensor, sinks: int, window: int, floor: float, normalize: bool
) -> Tensor:
    """Ada-KV per-KV-head budgets [B, Hkv] int32 (the layer's planned total is kept)."""
    return reference.adakv_budgets(scores, mask, keep, sinks, window, floor, normalize)


@budget_adakv.register_fake
def _(scores, mask, keep, sinks, window, floor, normalize):
    return scores.new_empty(scores.shape[:2], dtype=torch.int32)


@torch.library.custom_op("kvsurgery::select_compact_", mutates_args=STORE_MUTATES)
def select_compact_(
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
    scores: Tensor | None,
    budgets: Tensor | None,
    mask: Tensor | None,
    sinks: int,
    window: int,
) -> None:
    """Prefill eviction: keep sinks + window + top-scored tokens per (row, KV head), compacted into the store."""
    reference.select_compact_(
        k_store, v_store, pos, slot_score, keep, cap, start, length, seen, k, v, scores, budgets, mask, sinks, window
    )


@select_compact_.register_fake
def _(k_store, v_store, pos, slot_score, keep, cap, start, length, seen, k, v, scores, budgets, mask, sinks, window):
    return None


@torch.library.custom_op("kvsurgery::append_", mutates_args=STORE_MUTATES)
def append_(
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
    sinks: int,
    window: int,
    evict: bool,
    by_score: bool,
    score_new: str,
) -> None:
    """Decode: append one token per (row, KV head), evicting an unprotected token when the segment is full."""
    reference.append_(
        k_store,
        v_store,
        pos,
        slot_score,
        keep,
        cap,
        start,
        length,
        seen,
        k,
        v,
        sinks,
        window,
        evict,
        by_score,
        score_new,
    )


@append_.register_fake
def _(
    k_store, v_store, pos, slot_score, keep, cap, start, length, seen, k, v, sinks, window, evict, by_score, score_new
):
    return None


@torch.library.custom_op("kvsurgery::attend", mutates_args=())
def attend(
    q: Tensor,
    k_store: Tensor,
    v_store: Tensor,
    pos: Tensor,
    start: Tensor,
    length: Tensor,
    seen: Tensor,
    scale: float,
    window: int,
) -> Tensor:
    """Decode attention over the compressed store, per-head segment lengths and GQA -> [B, Hq, 1, D]."""
    return reference.attend(q, k_store, v_store, pos, start, length, seen, scale, window)


@attend.register_fake
def _(q, k_store, v_store, pos, start, length, seen, scale, window):
    return torch.empty_like(q)


@torch.library.custom_op("kvsurgery::attend_accumulate_", mutates_args=("slot_score",))
def attend_accumulate_(
    q: Tensor,
    k_store: Tensor,
    v_store: Tensor,
    pos: Tensor,
    slot_score: Tensor,
    start: Tensor,
    length: Tensor,
    seen: Tensor,
    scale: float,
    window: int,
) -> Tensor:
    """`attend` that also accumulates each slot's received attention into `slot_score` (H2O)."""
    return reference.attend_accumulate_(q, k_store, v_store, pos, slot_score, start, length, seen, scale, window)


@attend_accumulate_.register_fake
def _(q, k_store, v_store, pos, slot_score, start, length, seen, scale, window):
    return torch.empty_like(q)


# The Triton kernels become the CUDA implementations of the decode ops (CPU keeps the reference above).
from kvsurgery.kernels import register_cuda_kernels  # noqa: E402

register_cuda_kernels()
