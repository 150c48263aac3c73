"""Custom ops of the quantized store (`torch.ops.kvsurgery.*_quantized*`), backed by `kvsurgery.quant_reference`.

Each has a fake implementation for Dynamo/Inductor. The store tensors come in `STORE_MUTATES` order (the dense
region), then `QUANT_TENSORS` order (the packed region); the layout travels as `QuantLayout.text()`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery import quant_reference
from kvsurgery.ops.core import STORE_MUTATES
from kvsurgery.quant_layout import QUANT_TENSORS

_MUTATED = (*STORE_MUTATES, *QUANT_TENSORS)


@torch.library.custom_op("kvsurgery::select_quantized_", mutates_args=_MUTATED)
def select_quantized_(
    k_store: Tensor,
    v_store: Tensor,
    pos: Tensor,
    slot_score: Tensor,
    keep: Tensor,
    cap: Tensor,
    start: Tensor,
    length: Tensor,
    seen: Tensor,
    qk_codes: Tensor,
    qk_scale: Tensor,
    qk_low: Tensor,
    qv_codes: Tensor,
    qv_scale: Tensor,
    qv_low: Tensor,
    q_start: Tensor,
    q_cap: Tensor,
    q_len: Tensor,
    k: Tensor,
    v: Tensor,
    scores: Tensor | None,
    budgets: Tensor | None,
    mask: Tensor | None,
    quantize_first: Tensor | None,
    sinks: int,
    window: int,
    layout: str,
) -> None:
    """Prefill: keep what the unquantized store keeps; pack the layout's share, the rest stays full precision."""
    quant_reference.select_quantized_(
        k_store,
        v_store,
        pos,
        slot_score,
        keep,
        cap,
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
        q_cap,
        q_len,
        k,
        v,
        scores,
        budgets,
        mask,
        quantize_first,
        sinks,
        window,
        layout,
    )


@select_quantized_.register_fake
def _(*args, **kwargs):
    return None


@torch.library.custom_op("kvsurgery::append_quantized_", mutates_args=_MUTATED)
def append_quantized_(
    k_store: Tensor,
    v_store: Tensor,
    pos: Tensor,
    slot_score: Tensor,
    keep: Tensor,
    cap: Tensor,
    start: Tensor,
    length: Tensor,
    seen: Tensor,
    qk_codes: Tensor,
    qk_scale: Tensor,
    qk_low: Tensor,
    qv_codes: Tensor,
    qv_scale: Tensor,
    qv_low: Tensor,
    q_start: Tensor,
    q_cap: Tensor,
    q_len: Tensor,
    k: Tensor,
    v: Tensor,
    layout: str,
) -> None:
    """Decode: flush full KIVI residuals into the packed region, then append the new token in full precision."""
    quant_reference.append_quantized_(
        k_store,
        v_store,
        pos,
        slot_score,
        keep,
        cap,
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
        q_cap,
        q_len,
        k,
        v,
        layout,
    )


@append_quantized_.register_fake
def _(*args, **kwargs):
    return None


@torch.library.custom_op("kvsurgery::attend_quantized", mutates_args=())
def attend_quantized(
    q: Tensor,
    k_store: Tensor,
    v_store: Tensor,
    pos: Tensor,
    start: Tensor,
    length: Tensor,
    seen: Tensor,
    qk_codes: Tensor,
    qk_scale: Tensor,
    qk_low: Tensor,
    qv_codes: Tensor,
    qv_scale: Tensor,
    qv_low: Tensor,
    q_start: Tensor,
    q_len: Tensor,
    scale: float,
    layout: str,
    squeeze: float,
) -> Tensor:
    """Decode attention over the packed (dequantized, logit-squeezed) and full-precision tokens -> [B, Hq, 1, D]."""
    return quant_reference.attend_quantized(
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
    )


@attend_quantized.register_fake
def _(q, *args, **kwargs):
    return torch.empty_like(q)


# The fused-dequantization Triton kernel becomes the CUDA implementation of `attend_quantized` (CPU: the reference).
from kvsurgery.kernels import register_quantized_kernel  # noqa: E402

register_quantized_kernel()
