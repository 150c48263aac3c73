"""PyTorch reference of the quantized-store ops (the specification): prefill split, decode append, attention.

Layout and policies: `kvsurgery.reference.quant_layout`. The ops take the store as one `s: LayerTensors`: its core
tensors (k_store/v_store/pos/start/cap/length/seen) hold the dense (full-precision) region, `keep` keeps the heads'
budgets, and the packed region's tensors (`QUANT_TENSORS`: qk_*/qv_* codes and statistics, q_start/q_cap/q_len) follow.
Which tokens are kept at all is decided exactly as the unquantized store decides it
(`reference.select_compact_`), so an eviction recipe keeps the same tokens with or without quantization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery.errors import KVSurgeryError
from kvsurgery.reference import core as reference
from kvsurgery.reference.quant_codes import QuantSpec, compute_dtype, pack, quantize_tokens, squeeze_logits, unpack
from kvsurgery.reference.quant_layout import QuantLayout
from kvsurgery.store import LayerTensors

NEG_INF = float("-inf")


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return (x.cumsum(-1) - x).to(torch.int32)


def slot_grid(start: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Slot index [B, H, width] from each segment start, and the matching batch index."""
    slots = start.long()[..., None] + torch.arange(width, device=start.device)
    rows = torch.arange(start.shape[0], device=start.device)[:, None, None].expand_as(slots)
    return slots, rows


def kept_positions(
    k: Tensor, v: Tensor, scores: Tensor | None, keep: Tensor, mask: Tensor | None, sinks: int, window: int
) -> tuple[Tensor, Tensor]:
    """Token indices [B, H, W] (position order, -1 past the count) and counts [B, H] the unquantized store keeps
    with budgets `keep`: `reference.select_compact_` run on a scratch store."""
    b = k.shape[0]
    slots = int(keep.sum(-1).max()) if keep.numel() else 0
    scratch_k = k.new_zeros(b, slots, 1)  # only positions are read back: a 1-channel slice of k and v suffices
    scratch = LayerTensors(
        k_store=scratch_k,
        v_store=scratch_k.clone(),
        pos=torch.full((b, slots), -1, dtype=torch.int32, device=k.device),
        slot_score=k.new_zeros(0, dtype=torch.float32),
        keep=keep.clone(),
        cap=keep.clone(),
        start=_exclusive_cumsum(keep),
        length=torch.zeros_like(keep),
        seen=torch.zeros((), dtype=torch.int64, device=k.device),
    )
    reference.select_compact_(scratch, k[..., :1], v[..., :1], scores, None, mask, sinks, window)
    length = scratch.length
    width = int(length.max()) if length.numel() else 0
    grid, rows = slot_grid(scratch.start, width)
    taken = torch.arange(width, device=k.device) < length.long()[..., None]
    picked = scratch.pos[rows, grid.clamp(max=max(slots - 1, 0))].long() if width else grid
    return torch.where(taken, picked, -1), length.long()


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, T, D] at token indices [B, H, W] (any index < 0 reads token 0)."""
    return x.gather(2, index.clamp_min(0)[..., None].expand(*index.shape, x.shape[-1]))


def _split_in_order(positions: Tensor, packed: Tensor) -> tuple[Tensor, Tensor]:
    """Compact the entries flagged `packed` (and the others) of each row to its front, keeping their order."""

    def front(flag: Tensor) -> Tensor:
        order = torch.sort((~flag).to(torch.int8), dim=-1, stable=True).indices
        picked = positions.gather(-1, order)
        count = flag.sum(-1, keepdim=True)
        return torch.where(torch.arange(flag.shape[-1], device=flag.device) < count, picked, -1)

    valid = positions >= 0
    return front(valid & packed), front(valid & ~packed)


def write_packed(
    codes_p: Tensor, scale_p: Tensor, low_p: Tensor, spec: QuantSpec, x: Tensor, valid: Tensor, offset: Tensor
) -> None:
    """Quantize tokens x [B, H, W, D] (`valid` [B, H, W], a row's valid ones first) and write them, packed, to slots
    `offset + j` of each (row, head); their statistics go to the rows those slots use (`stats_rows`)."""
    b, n_kv, width, _ = x.shape
    codes, scale, low = quantize_tokens(x, valid, spec, scale_p.dtype)
    slots, rows = slot_grid(offset, width)
    codes_p[rows[valid], slots[valid]] = pack(codes, spec.bits)[valid]
    if spec.axis == "token":
        scale_p[rows[valid], slots[valid]] = scale[valid]
        low_p[rows[valid], slots[valid]] = low[valid]
    elif spec.group == 0:
        head = valid.any(-1)
        bi, hi = head.nonzero(as_tuple=True)
        scale_p[bi, hi] = scale[bi, hi, 0]
        low_p[bi, hi] = low[bi, hi, 0]
    else:
        g = spec.group
        used = valid.reshape(b, n_kv, width // g, g).any(-1)
        group_rows, g_rows = slot_grid(offset // g, width // g)
        scale_p[g_rows[used], group_rows[used]] = scale[used]
        low_p[g_rows[used], group_rows[used]] = low[used]


def read_packed(
    codes_p: Tensor, scale_p: Tensor, low_p: Tensor, spec: QuantSpec, offset: Tensor, width: int, dtype: torch.dtype
) -> Tensor:
    """Dequantized tokens [B, H, width, D] from slots `offset + j` (slots past the segment read garbage: mask them)."""
    slots, rows = slot_grid(offset, width)
    slots = slots.clamp(max=codes_p.shape[1] - 1)
    codes = unpack(codes_p[rows, slots], spec.bits).to(dtype)
    if spec.axis == "token":
        g = spec.group
        scale = scale_p[rows, slots].to(dtype).repeat_interleave(g, dim=-1)
        low = low_p[rows, slots].to(dtype).repeat_interleave(g, dim=-1)
    elif spec.group == 0:
        n_kv = offset.shape[1]
        scale = scale_p[:, :n_kv, None].to(dtype)
        low = low_p[:, :n_kv, None].to(dtype)
    else:
        scale = scale_p[rows, slots // spec.group].to(dtype)
        low = low_p[rows, slots // spec.group].to(dtype)
    return codes * scale + low


def _check_fits(what: str, needed: Tensor, allocated: int) -> None:
    worst = int(needed.max()) if needed.numel() else 0
    if worst > allocated:
        raise KVSurgeryError(
            f"internal: the quantized store needs {worst} {what} slots in a row but {allocated} were planned; a pass "
            "decides per-head budgets at prefill without declaring `dynamic_budgets = True`"
        )


def select_quantized_(
    s: LayerTensors,
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
    """Prefill: keep the tokens the unquantized store would keep, quantize the layout's share into the packed region
    and write the rest to the dense region, both in position order.

    `budgets` [B, H] (Ada-KV) replace the planned `keep`. `quantize_first` [B, T] bool (visual tokens) orders the
    CalibQuant policy: its `recent` dense slots go to the newest other (text) tokens first. The decode room is read
    from the freshly allocated tables (`cap - keep`), so one graph serves any generate() length.
    """
    lay = QuantLayout.parse(layout)
    room = (s.cap - s.keep).long()
    if budgets is not None:
        s.keep.copy_(budgets)
    positions, count = kept_positions(k, v, scores, s.keep, mask, sinks, window)
    rank = torch.arange(positions.shape[-1], device=k.device)
    n_packed = lay.packed_at_prefill(count)
    if lay.residual or quantize_first is None:
        packed = rank < n_packed[..., None]  # the oldest kept tokens
    else:
        first = quantize_first.bool().to(k.device).gather(-1, positions.clamp_min(0).flatten(1)).view_as(positions)
        order = torch.where(positions >= 0, first.long() * (1 << 40) - positions, 1 << 62)
        dense_rank = torch.argsort(torch.argsort(order, dim=-1, stable=True), dim=-1)
        packed = dense_rank >= (count - n_packed)[..., None]  # dense slots: the newest not-quantize-first tokens
    packed_pos, dense_pos = _split_in_order(positions, packed)

    packed_cap, dense_cap = lay.capacities(count, room)
    _check_fits("packed", packed_cap.sum(-1), s.qk_codes.shape[1])
    _check_fits("full-precision", dense_cap.sum(-1), s.k_store.shape[1])
    s.q_start.copy_(_exclusive_cumsum(packed_cap))
    s.q_cap.copy_(packed_cap)
    s.q_len.copy_(n_packed)
    s.cap.copy_(dense_cap)
    s.start.copy_(_exclusive_cumsum(dense_cap))
    s.length.copy_(count - n_packed)

    width = -(-int(n_packed.max()) // lay.align) * lay.align if n_packed.numel() else 0
    if width:
        index = torch.nn.functional.pad(packed_pos[..., :width], (0, max(0, width - packed_pos.shape[-1])), value=-1)
        valid = index >= 0
        write_packed(s.qk_codes, s.qk_scale, s.qk_low, lay.k, _take(k, index), valid, s.q_start)
        write_packed(s.qv_codes, s.qv_scale, s.qv_low, lay.v, _take(v, index), valid, s.q_start)

    s.pos.fill_(-1)
    n_dense = int((count - n_packed).max()) if count.numel() else 0
    index = dense_pos[..., :n_dense]
    valid = index >= 0
    slots, rows = slot_grid(s.start, n_dense)
    s.k_store[rows[valid], slots[valid]] = _take(k, index)[valid]
    s.v_store[rows[valid], slots[valid]] = _take(v, index)[valid]
    s.pos[rows[valid], slots[valid]] = index[valid].to(s.pos.dtype)
    s.seen.fill_(k.shape[2])


def flush_residual_(s: LayerTensors, lay: QuantLayout) -> None:
    """KIVI: every head whose dense residual is full quantizes its oldest `flush` tokens (one group) into the packed
    region and moves the remaining ones to the front of its segment."""
    full = s.length >= lay.residual
    if not bool(full.any()):
        return
    g, r = lay.flush, lay.residual
    if bool((s.q_len + g > s.q_cap)[full].any()):
        raise KVSurgeryError("internal: a quantized store's packed region is full; its plan undercounted decode room")
    slots, rows = slot_grid(s.start, r)
    oldest = full[..., None].expand(*full.shape, g)
    offset = s.q_start + s.q_len
    first = slots[..., :g].clamp(max=s.k_store.shape[1] - 1)  # heads that do not flush may end before r
    write_packed(s.qk_codes, s.qk_scale, s.qk_low, lay.k, s.k_store[rows[..., :g], first], oldest, offset)
    write_packed(s.qv_codes, s.qv_scale, s.qv_low, lay.v, s.v_store[rows[..., :g], first], oldest, offset)
    s.q_len.add_(full.to(s.q_len.dtype) * g)
    src, dst = slots[..., g:][full], slots[..., : r - g][full]
    row = rows[..., g:][full]
    for tensor in (s.k_store, s.v_store, s.pos):
        tensor[row, dst] = tensor[row, src]
    freed = slots[..., r - g :][full]
    s.pos[rows[..., r - g :][full], freed] = -1
    s.length.sub_(full.to(s.length.dtype) * g)


def flush_quantized_(s: LayerTensors, layout: str) -> None:
    """Decode, before the append: (KIVI) flush full residuals; nothing for layouts without a residual."""
    lay = QuantLayout.parse(layout)
    if lay.residual:
        flush_residual_(s, lay)


def append_quantized_(s: LayerTensors, k: Tensor, v: Tensor, layout: str) -> None:
    """Decode: (KIVI) flush full residuals, then append the new token to the dense region of every head."""
    flush_quantized_(s, layout)
    if bool((s.length >= s.cap).any()):
        raise KVSurgeryError("internal: a quantized store's full-precision region is full; its plan undercounted room")
    reference.append_(s, k, v, 0, 0, False, False, "position")


def attend_quantized(q: Tensor, s: LayerTensors, scale: float, layout: str, squeeze: float) -> Tensor:
    """Decode attention of one query per head over the packed and the dense tokens -> [B, Hq, 1, D].

    Packed keys and values are dequantized (x̂ = code * scale + lo); the packed tokens' logits are squeezed by
    `squeeze` nats (CalibQuant's calibration, per query head); one softmax covers both regions.
    """
    lay = QuantLayout.parse(layout)
    b, hq, _, d = q.shape
    n_kv = s.start.shape[1]
    dt = compute_dtype(q)
    qg = q.reshape(b, n_kv, hq // n_kv, d).to(dt)
    keys, values, ok, _, _ = reference.gather_segments(s, 0)
    dense = torch.einsum("bhgd,bhld->bhgl", qg, keys.to(dt)) * scale
    dense = dense.masked_fill(~ok[:, :, None], NEG_INF)
    width = int(s.q_len.max()) if s.q_len.numel() else 0
    packed_ok = torch.arange(width, device=q.device) < s.q_len.long()[..., None]
    k_hat = read_packed(s.qk_codes, s.qk_scale, s.qk_low, lay.k, s.q_start, width, dt)
    v_hat = read_packed(s.qv_codes, s.qv_scale, s.qv_low, lay.v, s.q_start, width, dt)
    packed = torch.einsum("bhgd,bhld->bhgl", qg, k_hat) * scale
    packed = squeeze_logits(packed, packed_ok[:, :, None], squeeze).masked_fill(~packed_ok[:, :, None], NEG_INF)
    probs = torch.softmax(torch.cat([packed, dense], -1), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgl,bhld->bhgd", probs[..., :width], v_hat)
    out = out + torch.einsum("bhgl,bhld->bhgd", probs[..., width:], values.to(dt))
    return out.reshape(b, hq, 1, d).to(q.dtype)
