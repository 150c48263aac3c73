"""Triton decode append: write one new token per (row, KV head) into its segment, evicting when it is full.

One program per (row, KV head) scans its own segment (bounded by its run-time `cap`, read on the device), so
nothing syncs with the host and one CUDA graph serves every step. The victim is the reference's: the lowest
slot score (or the oldest token) among tokens that are neither one of the `sinks` earliest nor among the
`window` most recent, falling back to non-sinks, then to any token; ties go to the first slot.
Matches `kvsurgery.reference.core.append_`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from kvsurgery.store import LayerTensors


@triton.jit
def _argmin_update(best, best_idx, count, cand, score, j):
    """Running (min score, first index of it, number of candidates) over the blocks of a segment."""
    vals = tl.where(cand, score, float("inf"))
    low = tl.min(vals, 0)
    idx = tl.min(tl.where(cand & (vals == low), j, 2147483647), 0)
    better = low < best
    return tl.where(better, low, best), tl.where(better, idx, best_idx), count + tl.sum(cand.to(tl.int32), 0)


@triton.jit
def _append_kernel(
    k_store_ptr,
    v_store_ptr,
    pos_ptr,
    score_ptr,
    cap_ptr,
    start_ptr,
    length_ptr,
    seen_ptr,
    k_ptr,
    v_ptr,
    window,
    n_kv,
    stride_ksb,
    stride_kss,
    stride_vsb,
    stride_vss,
    stride_pb,
    stride_sb,
    stride_tb,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    SINKS: tl.constexpr,
    EVICT: tl.constexpr,
    BY_SCORE: tl.constexpr,
    HAS_SCORE: tl.constexpr,
    SCORE_NEW_POSITION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // n_kv).to(tl.int64)  # 64-bit row offsets: B * S * D can pass 2**31
    h = bh % n_kv
    seen = tl.load(seen_ptr)
    seg_start = tl.load(start_ptr + b * stride_tb + h)
    seg_cap = tl.load(cap_ptr + b * stride_tb + h)
    seg_len = tl.load(length_ptr + b * stride_tb + h)
    full = seg_len >= seg_cap
    slot = seg_start + seg_len
    write = seg_len < seg_cap
    row_pos = pos_ptr + b * stride_pb
    if EVICT:
        if full:
            # Sinks: tokens no later than the SINKS-th earliest stored token (positions are unique per segment).
            cut = tl.full([], -1, tl.int64)
            for _ in tl.static_range(SINKS):
                nxt = tl.full([], 2147483647, tl.int64)
                for off in range(0, seg_cap, BLOCK):
                    j = off + tl.arange(0, BLOCK)
                    p = tl.load(row_pos + seg_start + j, mask=j < seg_cap, other=-1).to(tl.int64)
                    nxt = tl.minimum(nxt, tl.min(tl.where((p >= 0) & (p > cut), p, 2147483647), 0))
                cut = nxt
            inf = tl.full([], float("inf"), tl.float32)
            zero = tl.full([], 0, tl.int32)
            b1, i1, c1 = inf, zero, zero  # unprotected
            b2, i2, c2 = inf, zero, zero  # not a sink
            b3, i3, c3 = inf, zero, zero  # any stored token
            for off in range(0, seg_cap, BLOCK):
                j = off + tl.arange(0, BLOCK)
                in_seg = j < seg_cap
                p = tl.load(row_pos + seg_start + j, mask=in_seg, other=-1)
                filled = p >= 0
                if BY_SCORE:
                    score = tl.load(score_ptr + b * stride_sb + seg_start + j, mask=in_seg, other=0.0)
                else:
                    score = p.to(tl.float32)
                if SINKS > 0:
                    not_sink = filled & (p > cut)
                else:
                    not_sink = filled
                recent = p >= seen - window
                b1, i1, c1 = _argmin_update(b1, i1, c1, not_sink & ~recent, score, j)
                b2, i2, c2 = _argmin_update(b2, i2, c2, not_sink, score, j)
                b3, i3, c3 = _argmin_update(b3, i3, c3, filled, score, j)
            victim = tl.where(c1 > 0, i1, tl.where(c2 > 0, i2, i3))
            slot = seg_start + victim
            write = seg_cap > 0
    if write:
        d = tl.arange(0, D_PAD)
        kv = tl.load(k_ptr + b * stride_kb + h * stride_kh + d, mask=d < D)
        tl.store(k_store_ptr + b * stride_ksb + slot * stride_kss + d, kv, mask=d < D)
        dv = tl.arange(0, DV_PAD)
        vv = tl.load(v_ptr + b * stride_vb + h * stride_vh + dv, mask=dv < DV)
        tl.store(v_store_ptr + b * stride_vsb + slot * stride_vss + dv, vv, mask=dv < DV)
        tl.store(row_pos + slot, seen.to(tl.int32))
        if HAS_SCORE:
            if SCORE_NEW_POSITION:
                tl.store(score_ptr + b * stride_sb + slot, seen.to(tl.float32))
            else:
                tl.store(score_ptr + b * stride_sb + slot, 0.0)
    tl.store(length_ptr + b * stride_tb + h, tl.where(full, seg_len, seg_len + 1))


def append(
    s: LayerTensors,
    k: Tensor,
    v: Tensor,
    sinks: int,
    window: int,
    evict: bool,
    by_score: bool,
    score_new: str,
    block: int = 256,
) -> None:
    """Append k/v [B, Hkv, 1, D] to the store in place (see `kvsurgery.reference.core.append_`), then count the token.

    A full segment without `evict` is left untouched (the reference would overflow into the next segment; the
    store's `check_room` refuses that step before it runs).
    """
    b, n_kv, t, d = k.shape
    dv = v.shape[-1]
    if t != 1:
        raise ValueError(f"append writes one token per step, got k of shape {tuple(k.shape)}")
    has_score = s.slot_score.numel() > 0
    if by_score and not has_score:
        raise ValueError("append with by_score=True needs the store's slot_score plane (the plan has score_slots)")
    for name, tensor in (("k_store", s.k_store), ("v_store", s.v_store), ("pos", s.pos), ("k", k), ("v", v)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"append needs {name} contiguous in its last dimension")
    if not (s.cap.is_contiguous() and s.start.is_contiguous() and s.length.is_contiguous()):
        raise ValueError("append needs contiguous cap/start/length tables [B, Hkv]")
    _append_kernel[(b * n_kv,)](
        s.k_store,
        s.v_store,
        s.pos,
        s.slot_score,
        s.cap,
        s.start,
        s.length,
        s.seen,
        k,
        v,
        window,
        n_kv,
        s.k_store.stride(0),
        s.k_store.stride(1),
        s.v_store.stride(0),
        s.v_store.stride(1),
        s.pos.stride(0),
        s.slot_score.stride(0) if has_score else 0,
        s.start.stride(0),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        D=d,
        D_PAD=triton.next_power_of_2(d),
        DV=dv,
        DV_PAD=triton.next_power_of_2(dv),
        SINKS=sinks,
        EVICT=evict,
        BY_SCORE=by_score,
        HAS_SCORE=has_score,
        SCORE_NEW_POSITION=score_new == "position",
        BLOCK=block,
    )
    s.seen.add_(1)
