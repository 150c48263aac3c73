"""Split-KV Triton decode attention that reads the quantized store's packed 1/2/4-bit codes directly.

Each (row, KV head) has a packed region (codes + per-group scale/lo, `kvsurgery.reference.quant_layout`) and a
full-precision dense region. Stage 1 gives each (row, KV head) `n_splits` programs; each takes its share of both
regions, unpacks and dequantizes packed blocks in registers (x̂ = code * scale + lo, float32) and keeps one online
softmax over both. CalibQuant's logit calibration (`squeeze` > 0) needs each query head's min/max packed logit before
the softmax, so a pre-pass over the packed keys computes them first (it reads the key codes a second time). Stage 2 is
the dense kernel's merge. Bits and group layouts are compile-time constants. Matches
`kvsurgery.reference.quant.attend_quantized`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvsurgery.kernels.split_kv_attention import (
    LOG2E,
    default_splits,
    dense_strides,
    keys_in_block,
    load_group_queries,
    load_rows,
    merge_splits,
    pow2,
    segment_piece,
)
from kvsurgery.reference.quant_codes import QuantSpec
from kvsurgery.reference.quant_layout import QuantLayout
from kvsurgery.store import QUANT_TENSORS, LayerTensors


@triton.jit
def _packed_block(
    codes_ptr,
    scale_ptr,
    low_ptr,
    h,
    slot,
    n_ok,
    stride_cs,
    stride_ss,
    d,
    d_ok,
    BITS: tl.constexpr,
    TOKEN_AXIS: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Dequantized packed tokens [BLOCK_N, D_PAD] (float32) of `slot`; zeros past the piece or the head dim.

    Codes: 8 // BITS per byte along the channels, lowest bits first. Statistics: per token over GROUP channels
    (TOKEN_AXIS), per channel for the head (GROUP == 0), or per channel over GROUP tokens (row slot // GROUP).
    """
    per_byte: tl.constexpr = 8 // BITS
    ok = n_ok[:, None] & d_ok[None, :]
    slot64 = slot.to(tl.int64)
    byte = tl.load(codes_ptr + slot64[:, None] * stride_cs + (d // per_byte)[None, :], mask=ok, other=0)
    code = (byte.to(tl.int32) >> ((d % per_byte) * BITS)[None, :]) & ((1 << BITS) - 1)
    if TOKEN_AXIS:
        stat = slot64[:, None] * stride_ss + (d // GROUP)[None, :]
    elif GROUP == 0:
        stat = h * stride_ss + d[None, :] + 0 * slot64[:, None]
    else:
        stat = (slot64 // GROUP)[:, None] * stride_ss + d[None, :]
    scale = tl.load(scale_ptr + stat, mask=ok, other=0.0).to(tl.float32)
    low = tl.load(low_ptr + stat, mask=ok, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + low


@triton.jit
def _packed_range_kernel(
    q_ptr,
    kc_ptr,
    ks_ptr,
    kl_ptr,
    qstart_ptr,
    qlen_ptr,
    lo_part_ptr,
    hi_part_ptr,
    scale,
    n_kv,
    stride_qb,
    stride_qh,
    stride_kcb,
    stride_kcs,
    stride_ksb,
    stride_kss,
    stride_tb,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    N_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr,
    K_TOKEN: tl.constexpr,
    K_GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Min and max packed logit (natural units) of each query head over this split's piece of the packed region."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // n_kv).to(tl.int64)
    h = bh % n_kv
    p_start, lo, hi = segment_piece(qstart_ptr, qlen_ptr, b, h, stride_tb, split, N_SPLITS, BLOCK_N)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    g, q = load_group_queries(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, d, d_ok, True)
    s_min = tl.full([G_PAD], float("inf"), tl.float32)
    s_max = tl.full([G_PAD], float("-inf"), tl.float32)
    for off in range(lo, hi, BLOCK_N):
        n = off + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k = _packed_block(
            kc_ptr + b * stride_kcb,
            ks_ptr + b * stride_ksb,
            kl_ptr + b * stride_ksb,
            h,
            p_start + n,
            n_ok,
            stride_kcs,
            stride_kss,
            d,
            d_ok,
            K_BITS,
            K_TOKEN,
            K_GROUP,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s_min = tl.minimum(s_min, tl.min(tl.where(n_ok[None, :], s, float("inf")), 1))
        s_max = tl.maximum(s_max, tl.max(tl.where(n_ok[None, :], s, float("-inf")), 1))
    head = b * (n_kv * G) + h * G + g
    g_ok = g < G
    tl.store(lo_part_ptr + head * N_SPLITS + split, s_min, mask=g_ok)
    tl.store(hi_part_ptr + head * N_SPLITS + split, s_max, mask=g_ok)


@triton.jit
def _squeeze_map(lo_part_ptr, hi_part_ptr, head, g_ok, squeeze, N_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """(lo, factor) of each query head: its packed logits map to (s - lo) * factor + lo (CalibQuant's calibration,
    `kvsurgery.reference.quant_codes.squeeze_logits`: [min, max] -> [min, max - squeeze], collapsed when narrower)."""
    sp = tl.arange(0, SPLITS_PAD)
    ok = g_ok[:, None] & (sp < N_SPLITS)[None, :]
    offs = head[:, None] * N_SPLITS + sp[None, :]
    lo = tl.min(tl.load(lo_part_ptr + offs, mask=ok, other=float("inf")), 1)
    hi = tl.max(tl.load(hi_part_ptr + offs, mask=ok, other=float("-inf")), 1)
    any_packed = lo <= hi
    lo = tl.where(any_packed, lo, 0.0)
    spread = tl.where(any_packed, hi, 0.0) - lo
    factor = tl.maximum(spread - squeeze, 0.0) / (spread + 1e-8)
    return lo, factor


@triton.jit
def _online_update(m, den, acc, s, ok, v, PRECISION: tl.constexpr):
    """One block of the base-2 online softmax: logits s [G_PAD, BLOCK_N] (masked by ok), values v [BLOCK_N, D]."""
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    den = den * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, den, acc


@triton.jit
def _quant_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    start_ptr,
    length_ptr,
    kc_ptr,
    ks_ptr,
    kl_ptr,
    vc_ptr,
    vs_ptr,
    vl_ptr,
    qstart_ptr,
    qlen_ptr,
    lo_part_ptr,
    hi_part_ptr,
    o_part_ptr,
    lse_part_ptr,
    scale,
    squeeze,
    n_kv,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_pb,
    stride_tb,
    stride_kcb,
    stride_kcs,
    stride_ksb,
    stride_kss,
    stride_vcb,
    stride_vcs,
    stride_vsb,
    stride_vss,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    N_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr,
    K_TOKEN: tl.constexpr,
    K_GROUP: tl.constexpr,
    V_BITS: tl.constexpr,
    V_TOKEN: tl.constexpr,
    V_GROUP: tl.constexpr,
    SQUEEZE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // n_kv).to(tl.int64)  # 64-bit row offsets
    h = bh % n_kv
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    g, q = load_group_queries(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, d, d_ok, True)
    head = b * (n_kv * G) + h * G + g
    g_ok = g < G
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)

    # packed region: dequantize in registers, calibrate the logits (CalibQuant), one softmax with the dense region
    if SQUEEZE:
        s_lo, factor = _squeeze_map(lo_part_ptr, hi_part_ptr, head, g_ok, squeeze, N_SPLITS, SPLITS_PAD)
    p_start, lo, hi = segment_piece(qstart_ptr, qlen_ptr, b, h, stride_tb, split, N_SPLITS, BLOCK_N)
    for off in range(lo, hi, BLOCK_N):
        n = off + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        slot = p_start + n
        k = _packed_block(
            kc_ptr + b * stride_kcb,
            ks_ptr + b * stride_ksb,
            kl_ptr + b * stride_ksb,
            h,
            slot,
            n_ok,
            stride_kcs,
            stride_kss,
            d,
            d_ok,
            K_BITS,
            K_TOKEN,
            K_GROUP,
        )
        v = _packed_block(
            vc_ptr + b * stride_vcb,
            vs_ptr + b * stride_vsb,
            vl_ptr + b * stride_vsb,
            h,
            slot,
            n_ok,
            stride_vcs,
            stride_vss,
            d,
            d_ok,
            V_BITS,
            V_TOKEN,
            V_GROUP,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if SQUEEZE:
            s = (s - s_lo[:, None]) * factor[:, None] + s_lo[:, None]
        m, den, acc = _online_update(m, den, acc, s * LOG2E, n_ok, v, PRECISION)

    # dense (full-precision) region: the core store tensors, empty slots masked (no sliding window here)
    seg_start, lo, hi = segment_piece(start_ptr, length_ptr, b, h, stride_tb, split, N_SPLITS, BLOCK_N)
    for off in range(lo, hi, BLOCK_N):
        n = off + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        slot = seg_start + n
        ok = keys_in_block(pos_ptr, b * stride_pb, slot, n_ok, 0, 0)
        k = load_rows(k_ptr + b * stride_kb, slot, stride_ks, n_ok, d, d_ok).to(tl.float32)
        v = load_rows(v_ptr + b * stride_vb, slot, stride_vs, n_ok, d, d_ok).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)
        m, den, acc = _online_update(m, den, acc, s, ok, v, PRECISION)

    has = den > 0
    lse = tl.where(has, m + tl.log2(tl.where(has, den, 1.0)), float("-inf"))
    out = acc / tl.where(has, den, 1.0)[:, None]
    tl.store(lse_part_ptr + head * N_SPLITS + split, lse, mask=g_ok)
    o_off = (head * N_SPLITS + split)[:, None] * D + d[None, :]
    tl.store(o_part_ptr + o_off, out, mask=g_ok[:, None] & d_ok[None, :])


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Workspace allocation (tests poison it to prove every element is written before it is read)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(t: Tensor) -> Tensor:
    """The output, with the same strides as the op's fake implementation (`torch.empty_like(q)`)."""
    return torch.empty_like(t)


def _spec_constants(spec: QuantSpec, prefix: str) -> dict:
    return {f"{prefix}_BITS": spec.bits, f"{prefix}_TOKEN": spec.axis == "token", f"{prefix}_GROUP": spec.group}


def quantized_decode_attention(
    q: Tensor,
    s: LayerTensors,
    scale: float,
    layout: str | QuantLayout,
    squeeze: float,
    n_splits: int | None = None,
    block_n: int = 64,
) -> Tensor:
    """Attention of q [B, Hq, 1, D] over each KV head's packed and dense tokens -> [B, Hq, 1, D].
    `n_splits`/`block_n` override the launch shape."""
    lay = layout if isinstance(layout, QuantLayout) else QuantLayout.parse(layout)
    b, hq, tq, d = q.shape
    n_kv = s.start.shape[1]
    if tq != 1 or hq % n_kv or s.k_store.shape[-1] != d or s.v_store.shape[-1] != d:
        raise ValueError(
            f"quantized_decode_attention needs q [B, Hq, 1, D] with Hq a multiple of {n_kv} KV heads and K/V head "
            f"dim {d}; got q {tuple(q.shape)}, k_store {tuple(s.k_store.shape)}, v_store {tuple(s.v_store.shape)}"
        )
    rows = ("k_store", "v_store", "pos", *QUANT_TENSORS[:6])  # per-slot planes: codes and statistics
    for name, t in zip(rows, s.take(rows), strict=True):
        if t.stride(-1) != 1:
            raise ValueError(f"quantized_decode_attention needs {name} contiguous in its last dimension")
    if s.qk_scale.stride() != s.qk_low.stride() or s.qv_scale.stride() != s.qv_low.stride():
        raise ValueError("quantized_decode_attention needs each scale plane laid out like its lo plane")
    if not all(t.is_contiguous() for t in s.take(("start", "length", "q_start", "q_len"))):
        raise ValueError("quantized_decode_attention needs contiguous start/length/q_start/q_len tables [B, Hkv]")
    out = _empty_like(q)
    if q.stride(-1) != 1:
        q = q.contiguous()
    group = hq // n_kv
    slots = s.k_store.shape[1] + s.qk_codes.shape[1]
    splits = n_splits or default_splits(b, n_kv, slots, block_n, q.device)
    d_pad = pow2(d, 16)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    squeezing = squeeze > 0
    o_part = _empty((b * hq * splits * d,), torch.float32, q.device)
    lse_part = _empty((b * hq * splits,), torch.float32, q.device)
    lse = _empty((b * hq,), torch.float32, q.device)
    lo_part = _empty((b * hq * splits,) if squeezing else (1,), torch.float32, q.device)
    hi_part = _empty((b * hq * splits,) if squeezing else (1,), torch.float32, q.device)
    common = dict(G=group, G_PAD=pow2(group, 16), D=d, D_PAD=d_pad, N_SPLITS=splits, BLOCK_N=block_n)
    k_consts, v_consts = _spec_constants(lay.k, "K"), _spec_constants(lay.v, "V")
    if squeezing:
        _packed_range_kernel[(b * n_kv, splits)](
            q,
            s.qk_codes,
            s.qk_scale,
            s.qk_low,
            s.q_start,
            s.q_len,
            lo_part,
            hi_part,
            scale,
            n_kv,
            q.stride(0),
            q.stride(1),
            s.qk_codes.stride(0),
            s.qk_codes.stride(1),
            s.qk_scale.stride(0),
            s.qk_scale.stride(1),
            s.q_start.stride(0),
            **common,
            **k_consts,
            PRECISION=precision,
        )
    _quant_split_kernel[(b * n_kv, splits)](
        q,
        s.k_store,
        s.v_store,
        s.pos,
        s.start,
        s.length,
        s.qk_codes,
        s.qk_scale,
        s.qk_low,
        s.qv_codes,
        s.qv_scale,
        s.qv_low,
        s.q_start,
        s.q_len,
        lo_part,
        hi_part,
        o_part,
        lse_part,
        scale,
        squeeze,
        n_kv,
        *dense_strides(q, s),
        s.qk_codes.stride(0),
        s.qk_codes.stride(1),
        s.qk_scale.stride(0),
        s.qk_scale.stride(1),
        s.qv_codes.stride(0),
        s.qv_codes.stride(1),
        s.qv_scale.stride(0),
        s.qv_scale.stride(1),
        **common,
        SPLITS_PAD=pow2(splits, 2),
        **k_consts,
        **v_consts,
        SQUEEZE=squeezing,
        PRECISION=precision,
    )
    merge_splits(o_part, lse_part, out, lse, splits)
    return out


def bytes_read(
    lay: QuantLayout,
    packed: int,
    dense: int,
    n_kv: int,
    d: int,
    batch: int,
    stat_bytes: int,
    dense_bytes: int,
    squeeze: float = 0.0,
) -> int:
    """Bytes one call reads from the store with `packed` packed and `dense` full-precision tokens per (row, KV head):
    codes, statistics (once per group), dense K/V and positions, and the key codes and statistics once more for the
    calibration pre-pass (`squeeze` > 0). Queries and the small workspace are left out."""

    def region(spec: QuantSpec) -> int:
        rows, width = QuantLayout.stats_rows(spec, 1, packed, d)
        return packed * spec.packed_width(d) + 2 * rows * width * stat_bytes

    keys = region(lay.k)
    total = keys + region(lay.v) + (keys if squeeze > 0 else 0) + dense * (2 * d * dense_bytes + 4)
    return total * n_kv * batch
