"""Triton kernels over the compressed store, registered as the CUDA implementations of the kvsurgery ops.

The op schemas and their CPU implementation (the PyTorch reference) are untouched: on CUDA tensors the
dispatcher runs these kernels instead, which never sync with the host (CUDA-graph safe). Tests also run them
on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery import reference
from kvsurgery.kernels.append_evict import append
from kvsurgery.kernels.quant_append import append_quantized_without_sync
from kvsurgery.kernels.quantized_attention import quantized_decode_attention
from kvsurgery.kernels.sparse_gather import gather_attention
from kvsurgery.kernels.split_kv_attention import decode_attention
from kvsurgery.kernels.window_scores import window_attention_mass


def _attend(
    q: Tensor, k_store: Tensor, v_store: Tensor, pos: Tensor, start: Tensor, length: Tensor, seen: Tensor, scale, window
) -> Tensor:
    return decode_attention(q, k_store, v_store, pos, start, length, seen, scale, window)


def _attend_accumulate(
    q: Tensor,
    k_store: Tensor,
    v_store: Tensor,
    pos: Tensor,
    slot_score: Tensor,
    start: Tensor,
    length: Tensor,
    seen: Tensor,
    scale,
    window,
) -> Tensor:
    return decode_attention(q, k_store, v_store, pos, start, length, seen, scale, window, slot_score=slot_score)


def _append(
    k_store, v_store, pos, slot_score, keep, cap, start, length, seen, k, v, sinks, window, evict, by_score, score_new
) -> None:
    append(k_store, v_store, pos, slot_score, cap, start, length, seen, k, v, sinks, window, evict, by_score, score_new)


def score_window(q: Tensor, k: Tensor, mask: Tensor | None, scale, window, kernel, pool) -> Tensor:
    """SnapKV window scores: the Triton reduction over the last `window` queries, then the reference's pooling."""
    b, _, t, _ = q.shape
    w = min(window, t)
    if w == 0:  # no observation window: the reference's (degenerate) result
        return reference.window_scores(q, k, mask, scale, window, kernel, pool)
    if mask is None:  # causal, built on the device
        keys = torch.arange(t, device=q.device)
        allowed = (keys[None, :] <= keys[t - w :, None]).expand(b, -1, -1)
    else:
        allowed = reference.allowed_keys(mask, t - w, t, t, b)
    return reference.pool_prefix(window_attention_mass(q, k, allowed, scale), w, kernel, pool)


def register_cuda_kernels() -> None:
    """Make the Triton kernels the CUDA implementations of `attend`, `attend_accumulate_`, `append_` and
    `score_window`."""
    torch.library.register_kernel("kvsurgery::score_window", "cuda", score_window)
    torch.library.register_kernel("kvsurgery::attend", "cuda", _attend)
    torch.library.register_kernel("kvsurgery::attend_accumulate_", "cuda", _attend_accumulate)
    torch.library.register_kernel("kvsurgery::append_", "cuda", _append)


def _attend_quantized(
    q,
    k_store,
    v_store,
    pos,
    start,
    length,
    seen,
    qk_codes,
    qk_scale,
    qk_low,
    qv_codes,
    qv_scale,
    qv_low,
    q_start,
    q_len,
    scale,
    layout,
    squeeze,
) -> Tensor:
    packed = (qk_codes, qk_scale, qk_low, qv_codes, qv_scale, qv_low, q_start, q_len)
    return quantized_decode_attention(q, k_store, v_store, pos, start, length, *packed, scale, layout, squeeze)


def sparse_attend(
    q, k_store, v_store, pos, keep, start, length, seen, labels, label_range, channels, scale, tokens, fraction, bits
) -> Tensor:
    """Double Sparsity decode attention: label scores and top-k in torch ops without a host sync, then the gather
    kernel over the chosen slots."""
    from kvsurgery import sparse_attention as ds  # imported here: that module registers this function at import

    table = ds.channel_table(channels, q.shape[1], q.device)
    args = (q, pos, keep, start, length, seen, labels, label_range, table, scale, tokens, fraction, bits)
    chosen, ok = ds.select_without_sync(*args)
    return gather_attention(q, k_store, v_store, chosen, ok, scale)


def register_quantized_kernel() -> None:
    """Make the fused-dequantization kernel the CUDA implementation of `attend_quantized`, and the sync-free append
    that of `append_quantized_` (called by ops.quant)."""
    torch.library.register_kernel("kvsurgery::attend_quantized", "cuda", _attend_quantized)
    torch.library.register_kernel("kvsurgery::append_quantized_", "cuda", append_quantized_without_sync)


def register_sparse_kernel() -> None:
    """Make the gather kernel (after the torch selection) the CUDA implementation of `sparse_attend`."""
    torch.library.register_kernel("kvsurgery::sparse_attend", "cuda", sparse_attend)


__all__ = [
    "append",
    "append_quantized_without_sync",
    "decode_attention",
    "gather_attention",
    "quantized_decode_attention",
    "register_cuda_kernels",
    "register_quantized_kernel",
    "register_sparse_kernel",
    "score_window",
    "sparse_attend",
    "window_attention_mass",
]
