"""`append_quantized_` without host syncs or data-dependent shapes, the CUDA implementation (CUDA graphs capture it).

The reference (`kvsurgery.reference.quant.append_quantized_`) flushes only the heads whose KIVI residual is full,
selected with boolean masks, and checks capacities on the host. Here every head takes part with fixed shapes:
heads that do not flush write nothing (`put_where`), capacity checks are device-side assertions, and the new token
goes through `kvsurgery::append_` (its Triton kernel on CUDA). The resulting store is bit-identical to the
reference's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery.reference.quant import slot_grid
from kvsurgery.reference.quant_codes import QuantSpec, pack, quantize_tokens
from kvsurgery.reference.quant_layout import QuantLayout
from kvsurgery.store import CORE_TENSORS, LayerTensors


def put_where(t: Tensor, rows: Tensor, cols: Tensor, values: Tensor, valid: Tensor) -> None:
    """t[rows, cols] = values where `valid` (rows/cols/valid of one shape, values with t's trailing dims after it).

    Without a boolean index: entries that are not valid repeat the first valid entry (a duplicate write of the same
    value, so the order of duplicates does not matter) or, when no entry is valid, write t's own values back.
    """
    if valid.numel() == 0:
        return
    rows, cols, valid = rows.reshape(-1), cols.reshape(-1), valid.reshape(-1)
    values = values.reshape(rows.shape[0], *t.shape[2:])
    first = valid.to(torch.int32).argmax().reshape(1)
    any_valid = valid.any()
    row = torch.where(valid, rows, torch.where(any_valid, rows.index_select(0, first), rows))
    col = torch.where(valid, cols, torch.where(any_valid, cols.index_select(0, first), cols))
    wide = (-1,) + (1,) * (values.dim() - 1)
    own = t[rows, cols]
    fill = torch.where(any_valid, values.index_select(0, first), own)
    t[row, col] = torch.where(valid.reshape(wide), values, fill)


def write_packed_where(
    codes_p: Tensor, scale_p: Tensor, low_p: Tensor, spec: QuantSpec, x: Tensor, valid: Tensor, offset: Tensor
) -> None:
    """`quant_reference.write_packed` for one KIVI flush group per head (a flushed residual has fixed-size token groups,
    so no per-head-span statistics): quantize x [B, H, W, D], write the valid heads' codes to slots offset + j and
    their statistics."""
    b, n_kv, width, _ = x.shape
    codes, scale, low = quantize_tokens(x, valid, spec, scale_p.dtype)
    slots, rows = slot_grid(offset, width)
    slots = slots.clamp(max=codes_p.shape[1] - 1)
    put_where(codes_p, rows, slots, pack(codes, spec.bits), valid)
    if spec.axis == "token":
        put_where(scale_p, rows, slots, scale, valid)
        put_where(low_p, rows, slots, low, valid)
    else:
        g = spec.group
        used = valid.reshape(b, n_kv, width // g, g).any(-1)
        group_rows, g_rows = slot_grid(offset // g, width // g)
        group_rows = group_rows.clamp(max=scale_p.shape[1] - 1)
        put_where(scale_p, g_rows, group_rows, scale, used)
        put_where(low_p, g_rows, group_rows, low, used)


def flush_residual_without_sync(s: LayerTensors, lay: QuantLayout) -> None:
    """`quant_reference.flush_residual_` with fixed shapes: every head whose residual is full quantizes its oldest
    `flush` tokens and moves the others to the front of its segment; the other heads keep their values."""
    g, r = lay.flush, lay.residual
    full = s.length >= r
    torch._assert_async(
        ~(full & (s.q_len + g > s.q_cap)).any(), "a quantized store's packed region is full; its plan undercounted"
    )
    slots, rows = slot_grid(s.start, r)
    slots = slots.clamp(max=s.k_store.shape[1] - 1)
    oldest = full[..., None].expand(*full.shape, g)
    offset = s.q_start + s.q_len
    oldest_k, oldest_v = s.k_store[rows[..., :g], slots[..., :g]], s.v_store[rows[..., :g], slots[..., :g]]
    write_packed_where(s.qk_codes, s.qk_scale, s.qk_low, lay.k, oldest_k, oldest, offset)
    write_packed_where(s.qv_codes, s.qv_scale, s.qv_low, lay.v, oldest_v, oldest, offset)
    s.q_len.add_(full.to(s.q_len.dtype) * g)
    moved = full[..., None].expand(*full.shape, r - g)
    kept_rows, src, dst = rows[..., g:], slots[..., g:], slots[..., : r - g]
    for tensor in (s.k_store, s.v_store, s.pos):
        put_where(tensor, kept_rows, dst, tensor[kept_rows, src], moved)
    freed = full[..., None].expand(*full.shape, g)
    empty = torch.full(freed.shape, -1, dtype=s.pos.dtype, device=s.pos.device)
    put_where(s.pos, rows[..., r - g :], slots[..., r - g :], empty, freed)
    s.length.sub_(full.to(s.length.dtype) * g)


def append_quantized_without_sync(s: LayerTensors, k: Tensor, v: Tensor, layout: str) -> None:
    """Decode: (KIVI) flush full residuals, then append the new token to the dense region of every head."""
    lay = QuantLayout.parse(layout)
    if lay.residual:
        flush_residual_without_sync(s, lay)
    torch._assert_async((s.length < s.cap).all(), "a quantized store's full-precision region is full")
    torch.ops.kvsurgery.append_(*s.take(CORE_TENSORS), k, v, 0, 0, False, False, "position")
