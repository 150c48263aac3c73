"""Split-KV (flash-decoding) Triton attention of one query token over the segmented compressed store.

Stage 1 gives each (row, KV head) `n_splits` programs; each reads a contiguous piece of that head's segment
once for all G query heads of its group (GQA) and writes a partial softmax (normalised output + log-sum-exp).
Stage 2 merges the splits of every query head. The optional stage 3 (H2O bookkeeping) re-reads the keys and
adds each slot's final attention, averaged over the group, to `slot_score`. Softmax runs in float32 (base 2).
Split sizes derive from the per-head `length` inside the kernel, so the launch depends on static shapes only
(no host sync; CUDA-graph safe). Matches `kvsurgery.reference.core.attend` / `attend_accumulate_`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvsurgery.store import LayerTensors

LOG2E = 1.4426950408889634
# The CPU interpreter computes bf16 `tl.dot` wrongly (triton-lang/triton#11584): upcast there.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def keys_in_block(pos_ptr, row_pos, slot, n_ok, seen, window):
    """Which slots of a block attend: inside the filled part, non-empty, and within the sliding window."""
    p = tl.load(pos_ptr + row_pos + slot, mask=n_ok, other=-1)
    ok = n_ok & (p >= 0)
    return ok & ((window <= 0) | (p > seen - 1 - window))


@triton.jit
def load_rows(row_ptr, slot, stride_s, n_ok, d, d_ok):
    """One block of stored vectors [BLOCK_N, D_PAD] (zeros past the piece or the head dim)."""
    offsets = slot[:, None].to(tl.int64) * stride_s + d[None, :]
    return tl.load(row_ptr + offsets, mask=n_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def load_group_queries(q_ptr, b, h, stride_qb, stride_qh, G: tl.constexpr, G_PAD: tl.constexpr, d, d_ok, UPCAST):
    g = tl.arange(0, G_PAD)
    q = tl.load(
        q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
        mask=(g < G)[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    return g, q


@triton.jit
def segment_piece(start_ptr, length_ptr, b, h, stride_tb, split, N_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """[first slot of the segment, lo, hi): this split's piece of the filled part, in whole blocks."""
    seg_start = tl.load(start_ptr + b * stride_tb + h)
    seg_len = tl.load(length_ptr + b * stride_tb + h)
    chunk = tl.cdiv(tl.cdiv(seg_len, N_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seg_len)
    return seg_start, lo, hi


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    start_ptr,
    length_ptr,
    seen_ptr,
    o_part_ptr,
    lse_part_ptr,
    qk_scale,
    window,
    n_kv,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_pb,
    stride_tb,
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
    b = (bh // n_kv).to(tl.int64)  # 64-bit row offsets: B * S * D can pass 2**31
    h = bh % n_kv
    seen = tl.load(seen_ptr)
    seg_start, lo, hi = segment_piece(start_ptr, length_ptr, b, h, stride_tb, split, N_SPLITS, BLOCK_N)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    g, q = load_group_queries(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, d, d_ok, UPCAST)

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for off in range(lo, hi, BLOCK_N):
        n = off + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        slot = seg_start + n
        ok = keys_in_block(pos_ptr, b * stride_pb, slot, n_ok, seen, window)
        k = load_rows(k_ptr + b * stride_kb, slot, stride_ks, n_ok, d, d_ok)
        v = load_rows(v_ptr + b * stride_vb, slot, stride_vs, n_ok, d, d_ok)
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


@triton.jit
def _merge_kernel(
    o_part_ptr,
    lse_part_ptr,
    out_ptr,
    lse_ptr,
    n_heads,
    stride_ob,
    stride_oh,
    stride_od,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    N_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    head = tl.program_id(0)  # b * Hq + query head
    sp = tl.arange(0, SPLITS_PAD)
    sp_ok = sp < N_SPLITS
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    lse = tl.load(lse_part_ptr + head * N_SPLITS + sp, mask=sp_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top_safe)
    den = tl.sum(w, 0)
    parts = tl.load(o_part_ptr + (head * N_SPLITS + sp)[:, None] * D + d[None, :], mask=sp_ok[:, None] & d_ok[None, :])
    parts = tl.where(sp_ok[:, None], parts, 0.0)
    has = den > 0
    out = tl.sum(w[:, None] * parts, 0) / tl.where(has, den, 1.0)
    b = head // n_heads
    hq = head % n_heads
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + head, tl.where(has, top_safe + tl.log2(tl.where(has, den, 1.0)), float("-inf")))


@triton.jit
def _accumulate_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    start_ptr,
    length_ptr,
    seen_ptr,
    lse_ptr,
    score_ptr,
    qk_scale,
    window,
    n_kv,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_pb,
    stride_sb,
    stride_tb,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    N_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """slot_score[b, slot] += mean over the group of the final attention probability of that slot."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // n_kv).to(tl.int64)  # 64-bit row offsets: B * S * D can pass 2**31
    h = bh % n_kv
    seen = tl.load(seen_ptr)
    seg_start, lo, hi = segment_piece(start_ptr, length_ptr, b, h, stride_tb, split, N_SPLITS, BLOCK_N)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    g, q = load_group_queries(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, d, d_ok, UPCAST)
    g_ok = g < G
    lse = tl.load(lse_ptr + b * (n_kv * G) + h * G + g, mask=g_ok, other=0.0)
    for off in range(lo, hi, BLOCK_N):
        n = off + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        slot = seg_start + n
        ok = keys_in_block(pos_ptr, b * stride_pb, slot, n_ok, seen, window)
        k = load_rows(k_ptr + b * stride_kb, slot, stride_ks, n_ok, d, d_ok)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = g_ok[:, None] & ok[None, :]
        p = tl.where(keep, tl.exp2(tl.where(keep, s - lse[:, None], 0.0)), 0.0)
        gain = tl.sum(p, 0) / G
        old = tl.load(score_ptr + b * stride_sb + slot, mask=ok, other=0.0)
        tl.store(score_ptr + b * stride_sb + slot, old + gain, mask=ok)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Workspace allocation (tests poison it to prove every element is written before it is read)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(t: Tensor) -> Tensor:
    """The output, with the same strides as the op's fake implementation (`torch.empty_like(q)`)."""
    return torch.empty_like(t)


def pow2(n: int, least: int) -> int:
    return max(least, triton.next_power_of_2(n))


def merge_splits(o_part: Tensor, lse_part: Tensor, out: Tensor, lse: Tensor, splits: int) -> None:
    """Stage 2 of every split-KV kernel: merge each query head's `splits` partial outputs into out [B, Hq, 1, D]."""
    b, hq, _, d = out.shape
    _merge_kernel[(b * hq,)](
        o_part,
        lse_part,
        out,
        lse,
        hq,
        out.stride(0),
        out.stride(1),
        out.stride(3),
        D=d,
        D_PAD=pow2(d, 16),
        N_SPLITS=splits,
        SPLITS_PAD=pow2(splits, 2),
    )


def dense_strides(q: Tensor, s: LayerTensors) -> tuple[int, ...]:
    """The strides the split kernels read the query and the full-precision store with, in their argument order:
    q's (batch, head), k_store's and v_store's (row, slot), pos's and start's (row)."""
    return (
        q.stride(0),
        q.stride(1),
        s.k_store.stride(0),
        s.k_store.stride(1),
        s.v_store.stride(0),
        s.v_store.stride(1),
        s.pos.stride(0),
        s.start.stride(0),
    )


def default_splits(batch: int, n_kv: int, slots: int, block_n: int, device: torch.device) -> int:
    """Splits per (row, KV head): enough programs to fill the device, none shorter than one block.

    Depends on static shapes only (slots per row, not the run-time lengths), so one graph serves every step.
    """
    if device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    per_head_blocks = triton.cdiv(triton.cdiv(slots, max(n_kv, 1)), block_n)
    return max(1, min(triton.cdiv(programs, batch * n_kv), per_head_blocks, 256))


def decode_attention(
    q: Tensor,
    s: LayerTensors,
    scale: float,
    window: int,
    accumulate: bool = False,
    n_splits: int | None = None,
    block_n: int = 64,
) -> Tensor:
    """Attention of q [B, Hq, 1, D] over each KV head's segment -> [B, Hq, 1, D]; with `accumulate`, also adds
    each slot's attention (mean over its GQA group) to `s.slot_score`. `n_splits`/`block_n` override the launch
    shape."""
    b, hq, tq, d = q.shape
    n_kv = s.start.shape[1]
    if tq != 1 or hq % n_kv or s.v_store.shape[-1] != d or s.k_store.shape[-1] != d:
        raise ValueError(
            f"decode_attention needs q [B, Hq, 1, D] with Hq a multiple of {n_kv} KV heads and K/V head dim {d}; "
            f"got q {tuple(q.shape)}, k_store {tuple(s.k_store.shape)}, v_store {tuple(s.v_store.shape)}"
        )
    for name, t in (("k_store", s.k_store), ("v_store", s.v_store), ("pos", s.pos)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention needs {name} contiguous in its last dimension")
    if not (s.start.is_contiguous() and s.length.is_contiguous()):
        raise ValueError("decode_attention needs contiguous start/length tables [B, Hkv]")
    out = _empty_like(q)
    if q.stride(-1) != 1:
        q = q.contiguous()
    group = hq // n_kv
    splits = n_splits or default_splits(b, n_kv, s.k_store.shape[1], block_n, q.device)
    d_pad = pow2(d, 16)
    upcast = _INTERPRET or q.dtype == torch.float32
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32 stays exact on GPUs (no TF32)
    o_part = _empty((b * hq * splits * d,), torch.float32, q.device)
    lse_part = _empty((b * hq * splits,), torch.float32, q.device)
    lse = _empty((b * hq,), torch.float32, q.device)
    qk_scale = scale * LOG2E
    common = dict(G=group, G_PAD=pow2(group, 16), D=d, D_PAD=d_pad, N_SPLITS=splits, BLOCK_N=block_n)
    _split_kernel[(b * n_kv, splits)](
        q,
        s.k_store,
        s.v_store,
        s.pos,
        s.start,
        s.length,
        s.seen,
        o_part,
        lse_part,
        qk_scale,
        window,
        n_kv,
        *dense_strides(q, s),
        **common,
        UPCAST=upcast,
        PRECISION=precision,
    )
    merge_splits(o_part, lse_part, out, lse, splits)
    if accumulate:
        _accumulate_kernel[(b * n_kv, splits)](
            q,
            s.k_store,
            s.pos,
            s.start,
            s.length,
            s.seen,
            lse,
            s.slot_score,
            qk_scale,
            window,
            n_kv,
            q.stride(0),
            q.stride(1),
            s.k_store.stride(0),
            s.k_store.stride(1),
            s.pos.stride(0),
            s.slot_score.stride(0),
            s.start.stride(0),
            **common,
            UPCAST=upcast,
            PRECISION=precision,
        )
    return out


def decode_attention_accumulate(q: Tensor, s: LayerTensors, scale: float, window: int) -> Tensor:
    """`attend_accumulate_` on CUDA: `decode_attention` that also adds each slot's attention to `s.slot_score`."""
    return decode_attention(q, s, scale, window, accumulate=True)
