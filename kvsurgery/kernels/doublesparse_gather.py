"""Top-k gather attention (Double Sparsity): exact attention of each query group over its KV head's selected slots.

The selection (label scores, top-k) stays in torch ops; this kernel reads only the chosen rows of the store.
Stage 1 gives each (row, KV head) `n_splits` programs over its list of W selected slots; each gathers its share of
keys and values once for all G query heads of the group and keeps an online softmax (float32, base 2). Stage 2 is
the dense kernel's merge. Matches `kvsurgery.reference.doublesparse.attend_selected`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvsurgery.kernels.split_kv_attention import (
    _INTERPRET,
    LOG2E,
    load_group_queries,
    load_rows,
    merge_splits,
    pow2,
)


@triton.jit
def _gather_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    ok_ptr,
    o_part_ptr,
    lse_part_ptr,
    qk_scale,
    n_kv,
    width,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_sel,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    N_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // n_kv).to(tl.int64)
    h = bh % n_kv
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    g, q = load_group_queries(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, d, d_ok, UPCAST)
    chunk = tl.cdiv(tl.cdiv(width, N_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, width)
    sel = bh.to(tl.int64) * stride_sel

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for off in range(lo, hi, BLOCK_N):
        n = off + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        ok = n_ok & (tl.load(ok_ptr + sel + n, mask=n_ok, other=0) != 0)
        slot = tl.load(slots_ptr + sel + n, mask=ok, other=0)
        k = load_rows(k_ptr + b * stride_kb, slot, stride_ks, ok, d, d_ok)
        v = load_rows(v_ptr + b * stride_vb, slot, stride_vs, ok, d, d_ok)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    has = den > 0
    lse = tl.where(has, m + tl.log2(tl.where(has, den, 1.0)), float("-inf"))
    out = acc / tl.where(has, den, 1.0)[:, None]
    head = b * (n_kv * G) + h * G + g
    g_ok = g < G
    tl.store(lse_part_ptr + head * N_SPLITS + split, lse, mask=g_ok)
    o_off = (head * N_SPLITS + split)[:, None] * D + d[None, :]
    tl.store(o_part_ptr + o_off, out, mask=g_ok[:, None] & d_ok[None, :])


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Workspace allocation (tests poison it to prove every element is written before it is read)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def gather_splits(batch: int, n_kv: int, width: int, block_n: int, device: torch.device) -> int:
    """Splits per (row, KV head) over its W selected slots: enough programs to fill the device."""
    if device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, batch * n_kv), triton.cdiv(width, block_n), 256))


def gather_attention(
    q: Tensor,
    k_store: Tensor,
    v_store: Tensor,
    slots: Tensor,
    ok: Tensor,
    scale: float,
    n_splits: int | None = None,
    block_n: int = 64,
) -> Tensor:
    """Attention of q [B, Hq, 1, D] over the slots [B, Hkv, W] of each KV head where `ok` -> [B, Hq, 1, D]."""
    b, hq, tq, d = q.shape
    n_kv, width = slots.shape[1], slots.shape[2]
    if tq != 1 or hq % n_kv or k_store.shape[-1] != d or v_store.shape[-1] != d or ok.shape != slots.shape:
        raise ValueError(
            f"gather_attention needs q [B, Hq, 1, D], slots/ok [B, Hkv, W] with Hq a multiple of Hkv, K/V head dim "
            f"{d}; got q {tuple(q.shape)}, slots {tuple(slots.shape)}, ok {tuple(ok.shape)}, k {tuple(k_store.shape)}"
        )
    if k_store.stride(-1) != 1 or v_store.stride(-1) != 1:
        raise ValueError("gather_attention needs k_store and v_store contiguous in their last dimension")
    out = _empty_like(q)
    if q.stride(-1) != 1:
        q = q.contiguous()
    slots = slots.contiguous()
    ok = ok.to(torch.int8).contiguous()
    group = hq // n_kv
    splits = n_splits or gather_splits(b, n_kv, width, block_n, q.device)
    d_pad = pow2(d, 16)
    upcast = _INTERPRET or q.dtype == torch.float32
    precision = "ieee" if q.dtype == torch.float32 else None
    o_part = _empty((b * hq * splits * d,), torch.float32, q.device)
    lse_part = _empty((b * hq * splits,), torch.float32, q.device)
    lse = _empty((b * hq,), torch.float32, q.device)
    _gather_split_kernel[(b * n_kv, splits)](
        q,
        k_store,
        v_store,
        slots,
        ok,
        o_part,
        lse_part,
        scale * LOG2E,
        n_kv,
        width,
        q.stride(0),
        q.stride(1),
        k_store.stride(0),
        k_store.stride(1),
        v_store.stride(0),
        v_store.stride(1),
        width,
        G=group,
        G_PAD=pow2(group, 16),
        D=d,
        D_PAD=d_pad,
        N_SPLITS=splits,
        BLOCK_N=block_n,
        UPCAST=upcast,
        PRECISION=precision,
    )
    merge_splits(o_part, lse_part, out, lse, splits)
    return out
