"""Triton kernels over the compressed store: `CUDA_KERNELS` maps each op they implement on CUDA to its launcher.

`kvsurgery.ops.register()` installs them; the op schemas and their CPU implementation (the PyTorch reference) are
untouched: on CUDA tensors the dispatcher runs these kernels instead, which never sync with the host (CUDA-graph
safe). Each launcher takes the op's arguments by name (those it needs). Tests also run them on CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from kvsurgery.kernels.append_evict import append
from kvsurgery.kernels.doublesparse_gather import gather_attention
from kvsurgery.kernels.quant_append import append_quantized_without_sync
from kvsurgery.kernels.quant_attention import quantized_decode_attention
from kvsurgery.kernels.snapkv_window import score_window, window_attention_mass
from kvsurgery.kernels.split_kv_attention import decode_attention, decode_attention_accumulate
from kvsurgery.reference import doublesparse as ds
from kvsurgery.store import LayerTensors


def sparse_attend(
    q: Tensor, s: LayerTensors, channels: list[int], scale: float, tokens: int, fraction: float, bits: int
) -> Tensor:
    """Double Sparsity decode attention: label scores and top-k in torch ops without a host sync, then the gather
    kernel over the chosen slots."""
    table = ds.channel_table(channels, q.shape[1], q.device)
    chosen, ok = ds.select_without_sync(q, s, table, scale, tokens, fraction, bits)
    return gather_attention(q, s.k_store, s.v_store, chosen, ok, scale)


CUDA_KERNELS: dict[str, Callable[..., Tensor | None]] = {
    "score_window": score_window,
    "attend": decode_attention,
    "attend_accumulate_": decode_attention_accumulate,
    "append_": append,
    "attend_quantized": quantized_decode_attention,
    "append_quantized_": append_quantized_without_sync,
    "sparse_attend": sparse_attend,
}

__all__ = [
    "CUDA_KERNELS",
    "append",
    "append_quantized_without_sync",
    "decode_attention",
    "decode_attention_accumulate",
    "gather_attention",
    "quantized_decode_attention",
    "score_window",
    "sparse_attend",
    "window_attention_mass",
]
