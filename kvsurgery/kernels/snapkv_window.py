"""Triton prefill scoring reduction of SnapKV: the attention each key receives from the last `window` queries,
averaged over them and the GQA group (`kvsurgery.reference.snapkv.window_scores` before its pooling).

The R = G * window query rows of a (row, KV head) attend to all T keys. Three launches, none of which
materializes the [R, T] probabilities:
  1. partial softmax statistics: grid (B * Hkv, row blocks, key chunks); each program keeps the running max and
     denominator (base 2) of its rows over one chunk of keys;
  2. merge: grid (B * Hkv, row blocks); combines the chunks into each row's final max and denominator;
  3. scores: grid (B * Hkv, key blocks); each program recomputes its keys' logits for every row block and sums
     the probabilities over the rows (divided by R, as the reference's mean; fully masked rows add 0).
The mask (the model's own, or causal) arrives as a bool [B, window, T] table of which keys each row may see.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvsurgery.kernels.split_kv_attention import LOG2E, pow2
from kvsurgery.reference import snapkv
from kvsurgery.reference.core import allowed_keys


@triton.jit
def _load_query_rows(q_ptr, b, h, r, r_ok, t0, w, stride_qb, stride_qh, stride_qt, d, d_ok, G: tl.constexpr):
    """Query rows r = g * window + i (query head h * G + g, token t0 + i) as [BLOCK_R, D_PAD] float32."""
    head = h * G + r // w
    tok = t0 + r % w
    offs = b * stride_qb + head[:, None].to(tl.int64) * stride_qh + tok[:, None].to(tl.int64) * stride_qt + d[None, :]
    return tl.load(q_ptr + offs, mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _logits(q, k_ptr, b, h, j, j_ok, stride_kb, stride_kh, stride_kt, d, d_ok, qk_scale, PRECISION: tl.constexpr):
    offs = b * stride_kb + h * stride_kh + j[:, None].to(tl.int64) * stride_kt + d[None, :]
    k = tl.load(k_ptr + offs, mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale


@triton.jit
def _allowed(allowed_ptr, b, r, r_ok, j, j_ok, w, stride_ab, stride_ar):
    """Which (row, key) pairs attend: the mask table row of query i = r % window."""
    offs = b * stride_ab + (r % w)[:, None].to(tl.int64) * stride_ar + j[None, :]
    ok = r_ok[:, None] & j_ok[None, :]
    return ok & (tl.load(allowed_ptr + offs, mask=ok, other=0) != 0)


@triton.jit
def _partial_stats_kernel(
    q_ptr,
    k_ptr,
    allowed_ptr,
    m_part_ptr,
    den_part_ptr,
    qk_scale,
    n_kv,
    t,
    w,
    n_chunks,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_ab,
    stride_ar,
    G: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    chunk = tl.program_id(2)
    b = (bh // n_kv).to(tl.int64)
    h = (bh % n_kv).to(tl.int64)
    rows = G * w
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q = _load_query_rows(q_ptr, b, h, r, r_ok, t - w, w, stride_qb, stride_qh, stride_qt, d, d_ok, G)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    for off in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, t), BLOCK_N):
        j = off + tl.arange(0, BLOCK_N)
        j_ok = j < t
        s = _logits(q, k_ptr, b, h, j, j_ok, stride_kb, stride_kh, stride_kt, d, d_ok, qk_scale, PRECISION)
        s = tl.where(_allowed(allowed_ptr, b, r, r_ok, j, j_ok, w, stride_ab, stride_ar), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        den = den * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    part = (bh * n_chunks + chunk).to(tl.int64) * rows + r
    tl.store(m_part_ptr + part, m, mask=r_ok)
    tl.store(den_part_ptr + part, den, mask=r_ok)


@triton.jit
def _merge_stats_kernel(m_part_ptr, den_part_ptr, m_ptr, den_ptr, rows, n_chunks, BLOCK_R: tl.constexpr):
    bh = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    for chunk in range(0, n_chunks):
        part = (bh * n_chunks + chunk).to(tl.int64) * rows + r
        m_c = tl.load(m_part_ptr + part, mask=r_ok, other=float("-inf"))
        den_c = tl.load(den_part_ptr + part, mask=r_ok, other=0.0)
        m_new = tl.maximum(m, m_c)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        den = den * tl.exp2(m - m_safe) + den_c * tl.exp2(m_c - m_safe)
        m = m_new
    tl.store(m_ptr + bh.to(tl.int64) * rows + r, m, mask=r_ok)
    tl.store(den_ptr + bh.to(tl.int64) * rows + r, den, mask=r_ok)


@triton.jit
def _scores_kernel(
    q_ptr,
    k_ptr,
    allowed_ptr,
    m_ptr,
    den_ptr,
    out_ptr,
    qk_scale,
    n_kv,
    t,
    w,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_ab,
    stride_ar,
    G: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // n_kv).to(tl.int64)
    h = (bh % n_kv).to(tl.int64)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < t
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    rows = G * w
    total = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rows
        q = _load_query_rows(q_ptr, b, h, r, r_ok, t - w, w, stride_qb, stride_qh, stride_qt, d, d_ok, G)
        m = tl.load(m_ptr + bh.to(tl.int64) * rows + r, mask=r_ok, other=0.0)
        den = tl.load(den_ptr + bh.to(tl.int64) * rows + r, mask=r_ok, other=0.0)
        has = den > 0
        m = tl.where(has, m, 0.0)
        inv = tl.where(has, 1.0 / tl.where(has, den, 1.0), 0.0)
        s = _logits(q, k_ptr, b, h, j, j_ok, stride_kb, stride_kh, stride_kt, d, d_ok, qk_scale, PRECISION)
        ok = _allowed(allowed_ptr, b, r, r_ok, j, j_ok, w, stride_ab, stride_ar)
        p = tl.where(ok, tl.exp2(tl.where(ok, s - m[:, None], 0.0)), 0.0) * inv[:, None]
        total += tl.sum(p, 0)
    tl.store(out_ptr + bh.to(tl.int64) * t + j, total / rows, mask=j_ok)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Workspace and output allocation (tests poison it to prove every element is written before it is read)."""
    return torch.empty(shape, dtype=dtype, device=device)


def window_attention_mass(
    q: Tensor, k: Tensor, allowed: Tensor, scale: float, block_r: int = 64, block_n: int = 64, chunk: int = 1024
) -> Tensor:
    """Mean attention [B, Hkv, T] (float32) each key gets from the last w queries of q [B, Hq, T, D] (all query
    heads of its group), where allowed [B, w, T] (bool) says which keys each of those queries sees."""
    b, hq, t, d = q.shape
    n_kv = k.shape[1]
    w = allowed.shape[1]
    if hq % n_kv or k.shape[2] != t or k.shape[3] != d or allowed.shape != (b, w, t) or not 0 < w <= t:
        raise ValueError(
            f"window_attention_mass needs q [B, Hq, T, D], k [B, Hkv, T, D] with Hq a multiple of Hkv and allowed "
            f"[B, w, T] with 0 < w <= T; got q {tuple(q.shape)}, k {tuple(k.shape)}, allowed {tuple(allowed.shape)}"
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    allowed = allowed.to(torch.int8).contiguous()
    group = hq // n_kv
    rows = group * w
    block_r = min(block_r, pow2(rows, 16))
    chunk = max(block_n, chunk // block_n * block_n)
    n_chunks, n_row_blocks = triton.cdiv(t, chunk), triton.cdiv(rows, block_r)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    consts = dict(G=group, D=d, D_PAD=pow2(d, 16), BLOCK_R=block_r, BLOCK_N=block_n, PRECISION=precision)
    strides = (*q.stride()[:3], *k.stride()[:3], allowed.stride(0), allowed.stride(1))
    m_part = _empty((b * n_kv * n_chunks * rows,), torch.float32, q.device)
    den_part = _empty((b * n_kv * n_chunks * rows,), torch.float32, q.device)
    m = _empty((b * n_kv * rows,), torch.float32, q.device)
    den = _empty((b * n_kv * rows,), torch.float32, q.device)
    out = _empty((b, n_kv, t), torch.float32, q.device)
    qk_scale = scale * LOG2E
    _partial_stats_kernel[(b * n_kv, n_row_blocks, n_chunks)](
        q, k, allowed, m_part, den_part, qk_scale, n_kv, t, w, n_chunks, *strides, CHUNK=chunk, **consts
    )
    _merge_stats_kernel[(b * n_kv, n_row_blocks)](m_part, den_part, m, den, rows, n_chunks, BLOCK_R=block_r)
    _scores_kernel[(b * n_kv, triton.cdiv(t, block_n))](
        q, k, allowed, m, den, out, qk_scale, n_kv, t, w, *strides, **consts
    )
    return out


def score_window(q: Tensor, k: Tensor, mask: Tensor | None, scale, window, kernel, pool) -> Tensor:
    """SnapKV window scores: the Triton reduction over the last `window` queries, then the reference's pooling."""
    b, _, t, _ = q.shape
    w = min(window, t)
    if w == 0:  # no observation window: the reference's (degenerate) result
        return snapkv.window_scores(q, k, mask, scale, window, kernel, pool)
    if mask is None:  # causal, built on the device
        keys = torch.arange(t, device=q.device)
        allowed = (keys[None, :] <= keys[t - w :, None]).expand(b, -1, -1)
    else:
        allowed = allowed_keys(mask, t - w, t, t, b)
    return snapkv.pool_prefix(window_attention_mass(q, k, allowed, scale), w, kernel, pool)
