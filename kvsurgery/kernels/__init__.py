"""Triton kernels over the compressed store, registered as the CUDA implementations of the kvsurgery ops.

The op schemas and their CPU implementation (the PyTorch reference) are untouched: on CUDA tensors the
dispatcher runs these kernels instead, which never sync with the host (CUDA-graph safe). Tests also run them
on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery.kernels.append_evict import append
from kvsurgery.kernels.split_kv_attention import decode_attention


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


def register_cuda_kernels() -> None:
    """Make the Triton kernels the CUDA implementations of `attend`, `attend_accumulate_` and `append_`."""
    torch.library.register_kernel("kvsurgery::attend", "cuda", _attend)
    torch.library.register_kernel("kvsurgery::attend_accumulate_", "cuda", _attend_accumulate)
    torch.library.register_kernel("kvsurgery::append_", "cuda", _append)


__all__ = ["append", "decode_attention", "register_cuda_kernels"]
