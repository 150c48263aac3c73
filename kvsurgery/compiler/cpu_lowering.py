"""On CPU with compile=True, the decode ops become aten ops inside the captured graph, so Inductor fuses them.

Inductor cannot see into a custom op: on CPU each `kvsurgery::*` decode op runs its reference eagerly, which gathers
every head's segment of the store into a dense copy before attending (`kvsurgery.reference`). Here, before the
graph goes to Inductor, each decode op is replaced by an equivalent written over the store as it lies in memory:

- attention, where the plan gives every KV head an equal segment (`LayerPlan.uniform_heads`: planned budgets, rows
  of one length), views the store per head and multiplies each query group with its own head's slots only, the
  layout asserted in the graph (0.36 ms a layer at SmolLM2-135M's 4K shape on the 2-core box, against 0.69 ms for
  the form below; 2026-12-03, one process, with glibc's mmap threshold raised so that each call reuses its
  buffers, as a model's graph does from layer to layer);
- otherwise (Ada-KV's or HeadKV's per-head budgets, rows of different lengths) it multiplies every query head
  with every slot of the layer's store (one matmul that reads the store once) and masks each head to the filled
  slots of its own KV head's segment: the extra multiply-adds (x the KV-head count) cost less than gathering a
  copy of the segments;
- appends write the new token in place (`index_put_`), choosing an evicted slot with the same rule as the
  reference, over the same flat slot axis;
- KIVI's packed codes are unpacked by bit plane and dequantized by one kernel per K and V, vectorised over a
  plane's bytes, into a float copy that the two matmuls read in place (the query and the value output in plane
  order; per head where the heads are equal). Three things keep Inductor's CPU code vectorised and copy-free: the
  per-group key statistics are looked up by slot // group from a small plane-ordered copy, not by splitting the
  symbolic slot axis (sizes Inductor cannot prove equal, so a copy before the matmul); the per-token value
  statistics are picked by comparisons on the byte, not by splitting a plane into runs shorter than a vector; and
  the planes are unpacked by broadcast shifts, not stacked (a `cat`). Per layer at SmolLM2-135M's 4K shape on the
  2-core box (kernel profile of a one-layer model, 2026-12-03): 0.13 ms for K and 0.13 ms for V, against 0.64 ms
  (K, with RoPE), 0.25 ms (V) and 0.40 ms of `cat` before. Dequantizing inside the logit and value reductions
  instead, so that x̂ is never written, matched this in an isolated function but gave one 20.4 ms kernel a layer in
  the model's decode graph (same profile);
- KIVI's append writes the new token in place; its flush stays an op (`kvsurgery::flush_quantized_`, the
  reference), which returns at once on the steps where no head's residual is full (all but one in `flush`): a
  graph has no branch, so a flush written in aten ops ran on every step (0.2 ms a layer).

Shapes stay static apart from the store's slot count (symbolic), so no op needs a size read from the device. The
eager path keeps running the reference; the tests hold the lowered graph to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, fx

from kvsurgery.fx_utils import UNIFORM_HEADS
from kvsurgery.reference.quant_codes import QuantSpec, compute_dtype
from kvsurgery.reference.quant_layout import QuantLayout

NEG_INF = float("-inf")


def _value(arg) -> Tensor:
    """The example (fake) tensor Dynamo recorded for a graph value."""
    return arg.node.meta["example_value"] if isinstance(arg, fx.Proxy) else arg


def _arange(like, n, device: torch.device, stop=None):
    """torch.arange(n) (or (n, stop)) as a node of the graph `like` (a proxy) is traced into, not a constant."""
    args = (n,) if stop is None else (n, stop)
    if isinstance(like, fx.Proxy):
        return like.tracer.create_proxy("call_function", torch.arange, args, {"device": device})
    return torch.arange(*args, device=device)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # as reference.acc_dtype


def segment_slots(start: Tensor, length: Tensor, n_slots, device: torch.device) -> Tensor:
    """[B, Hkv, S] bool: slot s lies in the first `length` slots of (row, KV head)'s segment."""
    s = torch.arange(n_slots, device=device)
    return (s >= start[..., None]) & (s < (start + length)[..., None])


def _check_uniform(start, n_slots, n_kv: int, device: torch.device, what: str) -> None:
    """Assert, in the compiled graph, that head h's segment starts at h x (n_slots / n_kv) (what the planner promised
    with `LayerPlan.uniform_heads`): a per-head view of any other layout would attend to the wrong slots."""
    width = n_slots // n_kv
    expected = _arange(start, n_kv, device) * width
    message = f"internal: the {what} segments of a layer planned with equal KV heads are not equal"
    torch._assert_async((start == expected).all(), message)


def _per_head(t, n_kv: int):
    """[B, S, ...] -> [B * n_kv, S / n_kv, ...]: each KV head's segment of a uniform layer as its own batch entry."""
    return t.unflatten(1, (n_kv, -1)).flatten(0, 1)


def _masked_attention(q, k, v, allowed, scale: float):
    """softmax(q k^T x scale, keys not `allowed` at -inf) v -> (out, probs): q [R, G, D], k and v [R, S, *], `allowed`
    broadcast to [R, G, S]. A query with no allowed key gets zeros."""
    logits = torch.matmul(q, k.transpose(1, 2)) * scale
    probs = torch.softmax(logits.masked_fill(~allowed, NEG_INF), dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v), probs


def _two_region_attention(qf, k_hat, v_hat, k_dense, v_dense, packed_ok, dense_ok, scale: float, lay: QuantLayout):
    """One softmax over the packed slots (dequantized, channels in plane order) and the dense slots -> output
    [R, G, Dv] in channel order: qf [R, G, D], masks broadcast to [R, G, packed] and [R, G, dense]."""
    packed = torch.matmul(_plane_order(qf, 8 // lay.k.bits), k_hat.transpose(1, 2)) * scale
    dense = torch.matmul(qf, k_dense.transpose(1, 2)) * scale
    logits = torch.cat([packed.masked_fill(~packed_ok, NEG_INF), dense.masked_fill(~dense_ok, NEG_INF)], dim=-1)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    n_packed = k_hat.size(1)
    out = _channel_order(torch.matmul(probs[..., :n_packed], v_hat), 8 // lay.v.bits)
    return out + torch.matmul(probs[..., n_packed:], v_dense)


def _attend_flat(q: Tensor, k_store: Tensor, v_store: Tensor, pos: Tensor, start: Tensor, length: Tensor,
                 seen: Tensor, scale: float, window: int):  # fmt: skip
    """Decode attention over the whole store, each query head masked to its KV head's segment -> (out [B, Hq, 1, D],
    probs [B, Hkv, G, S], ok [B, Hkv, S])."""
    b, hq, _, d = _value(q).shape
    n_kv = _value(start).shape[1]
    g = hq // n_kv
    dt = _acc(_value(q).dtype)
    ok = segment_slots(start, length, k_store.size(1), _value(q).device) & (pos >= 0)[:, None, :]
    if window > 0:
        ok = ok & (pos > seen - 1 - window)[:, None, :]
    allowed = ok[:, :, None, :].expand(-1, -1, g, -1).reshape(b, hq, -1)
    out, probs = _masked_attention(q.reshape(b, hq, d).to(dt), k_store.to(dt), v_store.to(dt), allowed, scale)
    return out.reshape(b, hq, 1, -1).to(_value(q).dtype), probs.reshape(b, n_kv, g, -1), ok


def _attend_per_head(q: Tensor, k_store: Tensor, v_store: Tensor, pos: Tensor, start: Tensor, length: Tensor,
                     seen: Tensor, scale: float, window: int):  # fmt: skip
    """`_attend_flat` for a layer whose KV heads own equal segments: each query group attends to its own head's
    segment only (a third of the multiply-adds at 3 KV heads) -> (out, probs [B, Hkv, G, S / Hkv], ok [B, Hkv, S /
    Hkv])."""
    b, hq, _, d = _value(q).shape
    n_kv = _value(start).shape[1]
    g, dt, device = hq // n_kv, _acc(_value(q).dtype), _value(q).device
    _check_uniform(start, k_store.size(1), n_kv, device, "full-precision")
    p = pos.unflatten(1, (n_kv, -1))
    ok = (_arange(start, p.size(-1), device) < length[..., None]) & (p >= 0)
    if window > 0:
        ok = ok & (p > seen - 1 - window)
    k, v = (_per_head(t, n_kv).to(dt) for t in (k_store, v_store))
    out, probs = _masked_attention(q.reshape(b * n_kv, g, d).to(dt), k, v, ok.reshape(b * n_kv, 1, -1), scale)
    return out.reshape(b, hq, 1, -1).to(_value(q).dtype), probs.reshape(b, n_kv, g, -1), ok


def attend(q, k_store, v_store, pos, start, length, seen, scale, window, uniform_heads=False):
    """Lowered `kvsurgery::attend`."""
    fn = _attend_per_head if uniform_heads else _attend_flat
    return fn(q, k_store, v_store, pos, start, length, seen, scale, window)[0]


def attend_accumulate_(q, k_store, v_store, pos, slot_score, start, length, seen, scale, window, uniform_heads=False):
    """Lowered `kvsurgery::attend_accumulate_`: each slot gains its group's mean attention (zero off the group)."""
    if uniform_heads:  # slot h * (S / Hkv) + j of the store is slot j of head h
        out, probs, ok = _attend_per_head(q, k_store, v_store, pos, start, length, seen, scale, window)
        slot_score.add_(probs.mean(dim=2).float().masked_fill(~ok, 0.0).flatten(1))
        return out
    out, probs, ok = _attend_flat(q, k_store, v_store, pos, start, length, seen, scale, window)
    gain = probs.mean(dim=2).float().masked_fill(~ok, 0.0)  # [B, Hkv, S]; a slot is in one head's segment only
    slot_score.add_(gain.sum(dim=1))
    return out


def append_(k_store, v_store, pos, slot_score, keep, cap, start, length, seen, k, v, sinks, window, evict,
            by_score, score_new):  # fmt: skip
    """Lowered `kvsurgery::append_`: the same slot choice as `reference.append_`, written in place."""
    b, n_kv = _value(start).shape
    device = _value(start).device
    new_slot = start.long() + length.long()
    full = length >= cap
    if evict:
        in_seg = segment_slots(start, cap, k_store.size(1), device)
        p = torch.where(in_seg, pos[:, None, :].long(), -1)
        filled = p >= 0
        score = slot_score[:, None, :] if by_score else p.float()
        big = torch.iinfo(torch.int64).max
        if sinks > 0:
            cut = torch.where(filled, p, big).topk(sinks, dim=-1, largest=False).values[..., -1:]
            is_sink = filled & (p <= cut)
        else:
            is_sink = torch.zeros_like(filled)
        recent = p >= seen - window
        cand = filled & ~is_sink & ~recent
        cand = torch.where(cand.any(-1, keepdim=True), cand, filled & ~is_sink)
        cand = torch.where(cand.any(-1, keepdim=True), cand, filled)
        victim = torch.where(cand, score, float("inf")).argmin(dim=-1)
        new_slot = torch.where(full, victim, new_slot)
    rows = _arange(start, b, device)[:, None].expand(b, n_kv)
    k_store.index_put_((rows, new_slot), k[:, :, 0])
    v_store.index_put_((rows, new_slot), v[:, :, 0])
    pos.index_put_((rows, new_slot), seen.to(_value(pos).dtype).expand(b, n_kv))
    if _value(slot_score).numel():
        new_score = seen.float() if score_new == "position" else torch.zeros_like(seen, dtype=torch.float32)
        slot_score.index_put_((rows, new_slot), new_score.expand(b, n_kv))
    length.copy_(torch.where(full, length, length + 1))
    seen.add_(1)


def _shifts(like, bits: int, device: torch.device):
    """The bit offset of each code in a byte, low bits first (`quantization.pack`), as a graph node."""
    kwargs = {"dtype": torch.uint8, "device": device}
    if isinstance(like, fx.Proxy):
        return like.tracer.create_proxy("call_function", torch.arange, (0, 8, bits), kwargs)
    return torch.arange(0, 8, bits, **kwargs)


def _bit_planes(codes, bits: int, device: torch.device):
    """Packed bytes [B, S, W] -> codes [B, S, P, W], P = 8 // bits planes: plane j holds channels j, j + P, ...
    (`quant_codes.pack` puts channel i * P + j in bits j * bits of byte i). The shift is constant along each plane's
    bytes, so the unpacking is one contiguous, vectorisable op that Inductor inlines into the dequantization."""
    return (codes[..., None, :] >> _shifts(codes, bits, device)[:, None]) & ((1 << bits) - 1)


def _plane_order(x, planes: int):
    """Channels [..., D] -> plane order: position j * (D // P) + i holds channel i * P + j."""
    return x.unflatten(-1, (-1, planes)).transpose(-1, -2).flatten(-2)


def _channel_order(x, planes: int):
    """Plane order [..., D] -> channels (the inverse of `_plane_order`)."""
    return x.unflatten(-1, (planes, -1)).transpose(-1, -2).flatten(-2)


def _per_byte(stats, run: int, width: int, device: torch.device):
    """Per-token statistics [R, S, groups] -> [R, S, width]: byte w's group (w // run) picked by comparisons on w.
    With the plane split into runs instead, Inductor vectorises over a run, which can be shorter than a register
    (8 floats at 2 bits and 32-channel groups: half an AVX-512 register, masked)."""
    w = _arange(stats, width, device)
    out = stats[..., :1]
    for k in range(1, width // run):
        out = torch.where(w >= k * run, stats[..., k : k + 1], out)
    return out


def _realized_plane_order(stats, planes: int, d: int):
    """Statistics [R, N, D] -> [R, N, P, D / P] in plane order, written out contiguously: read in place, the
    permuted view makes Inductor vectorise over P elements (a transpose per slot) instead of D / P."""
    from torch._inductor.inductor_prims import force_stride_order  # defines the prim Inductor lowers to a copy

    view = _plane_order(stats, planes).unflatten(-1, (planes, d // planes))
    return force_stride_order(view, [stats.size(1) * d, d, d // planes, 1])


def _dequantized(codes, scale, low, spec: QuantSpec, dt: torch.dtype, n_kv: int = 1):
    """x̂ [B n_kv, S / n_kv, D] of every packed slot (n_kv > 1: each KV head's segment its own row, `_per_head`),
    channels in plane order (`_plane_order`). Inductor computes it in one kernel vectorised over a plane's bytes and
    writes it once, in the layout the matmuls read."""
    width = _value(codes).shape[-1]
    planes = 8 // spec.bits
    device = _value(codes).device
    codes, scale, low = (_per_head(t, n_kv) if n_kv > 1 else t for t in (codes, scale, low))
    x = _bit_planes(codes, spec.bits, device).to(dt)  # [R, S, P, W]
    if spec.axis == "token":  # one (scale, lo) per slot and group of channels: runs of group // P bytes a plane
        scale, low = (_per_byte(t.to(dt), spec.group // planes, width, device)[:, :, None] for t in (scale, low))
        return (x * scale + low).flatten(2)
    # one (scale, lo) per group of slots and channel, looked up by slot // group: splitting the symbolic slot axis
    # into groups would leave Inductor sizes it cannot prove equal (a copy before each matmul)
    group_of = _arange(codes, codes.size(1), device) // spec.group
    scale, low = (_realized_plane_order(t.to(dt), planes, planes * width)[:, group_of] for t in (scale, low))
    return (x * scale + low).flatten(2)


def _attend_quantized_per_head(q, k_store, v_store, pos, start, length, qk_codes, qk_scale, qk_low, qv_codes,
                               qv_scale, qv_low, q_start, q_len, scale, lay: QuantLayout):  # fmt: skip
    """`attend_quantized` for a layer whose KV heads own equal segments in both regions: each query group attends
    to its own head's packed and dense slots only."""
    b, hq, _, d = _value(q).shape
    n_kv = _value(start).shape[1]
    g, dt, device = hq // n_kv, compute_dtype(_value(q)), _value(q).device
    _check_uniform(start, k_store.size(1), n_kv, device, "full-precision")
    _check_uniform(q_start, qk_codes.size(1), n_kv, device, "packed")
    k_hat = _dequantized(qk_codes, qk_scale, qk_low, lay.k, dt, n_kv)  # [B * Hkv, packed / Hkv, D]
    v_hat = _dequantized(qv_codes, qv_scale, qv_low, lay.v, dt, n_kv)
    packed_ok = _arange(start, k_hat.size(1), device) < q_len.reshape(-1, 1)
    p = _per_head(pos, n_kv)
    dense_ok = (_arange(start, p.size(-1), device) < length.reshape(-1, 1)) & (p >= 0)
    k_dense, v_dense = (_per_head(t, n_kv).to(dt) for t in (k_store, v_store))
    qf = q.reshape(b * n_kv, g, d).to(dt)
    out = _two_region_attention(qf, k_hat, v_hat, k_dense, v_dense, packed_ok[:, None], dense_ok[:, None], scale, lay)
    return out.reshape(b, hq, 1, -1).to(_value(q).dtype)


def attend_quantized(q, k_store, v_store, pos, start, length, seen, qk_codes, qk_scale, qk_low, qv_codes, qv_scale,
                     qv_low, q_start, q_len, scale, layout, squeeze, uniform_heads=False):  # fmt: skip
    """Lowered `kvsurgery::attend_quantized`: one softmax over the dequantized packed slots and the dense region, each
    query head masked to its KV head's segments."""
    lay = QuantLayout.parse(layout)
    if uniform_heads:
        return _attend_quantized_per_head(q, k_store, v_store, pos, start, length, qk_codes, qk_scale, qk_low,
                                          qv_codes, qv_scale, qv_low, q_start, q_len, scale, lay)  # fmt: skip
    b, hq, _, d = _value(q).shape
    n_kv = _value(start).shape[1]
    g, dt, device = hq // n_kv, compute_dtype(_value(q)), _value(q).device
    qf = q.reshape(b, hq, d).to(dt)

    def per_query_head(ok):
        return ok[:, :, None, :].expand(-1, -1, g, -1).reshape(b, hq, -1)

    dense_ok = per_query_head(segment_slots(start, length, k_store.size(1), device) & (pos >= 0)[:, None, :])
    packed_ok = per_query_head(segment_slots(q_start, q_len, qk_codes.size(1), device))
    k_hat = _dequantized(qk_codes, qk_scale, qk_low, lay.k, dt)  # channels in plane order, as the query then
    v_hat = _dequantized(qv_codes, qv_scale, qv_low, lay.v, dt)
    out = _two_region_attention(qf, k_hat, v_hat, k_store.to(dt), v_store.to(dt), packed_ok, dense_ok, scale, lay)
    return out.reshape(b, hq, 1, -1).to(_value(q).dtype)


def _lowerable_quantized(layout: str, squeeze: float) -> bool:
    """Layouts whose statistics are per slot or per group of slots (KIVI), without logit squeezing (CalibQuant),
    whose channel groups hold whole runs of each bit plane (`_dequantized`)."""
    lay = QuantLayout.parse(layout)
    specs = (lay.k, lay.v)
    return (
        squeeze <= 0
        and not any(s.axis == "channel" and s.group == 0 for s in specs)
        and all(s.axis == "channel" or s.group % (8 // s.bits) == 0 for s in specs)
    )


def _has_residual(layout: str) -> bool:
    """KIVI layouts: a full-precision residual that flushes into the packed region."""
    return QuantLayout.parse(layout).residual > 0


def append_quantized_(k_store, v_store, pos, slot_score, keep, cap, start, length, seen, qk_codes, qk_scale, qk_low,
                      qv_codes, qv_scale, qv_low, q_start, q_cap, q_len, k, v, layout):  # fmt: skip
    """Lowered `kvsurgery::append_quantized_` (KIVI): the flush stays an op (`flush_quantized_`, the reference, which
    returns at once unless a head's residual is full: one step in `flush`), then the token is appended in place.

    A graph has no branch, so a flush written in aten ops ran on every step for every head and was written only for
    the flushing ones: 0.2 ms a layer at SmolLM2-135M's 4K shape on the 2-core box (2026-12-03, kernel profile of
    a one-layer model), about half of the 0.43 ms a layer that KIVI's decode added to the full cache's."""
    store = (k_store, v_store, pos, slot_score, keep, cap, start, length, seen)
    packed = (qk_codes, qk_scale, qk_low, qv_codes, qv_scale, qv_low, q_start, q_cap, q_len)
    flush = torch.ops.kvsurgery.flush_quantized_.default
    start.tracer.create_proxy("call_function", flush, (*store, *packed, layout), {})
    append_(*store, k, v, 0, 0, False, False, "position")


@functools.cache
def _lowerings() -> dict[object, tuple[Callable, Callable]]:
    """Each lowered op -> (its aten lowering, whether a call's constant arguments allow it; otherwise the reference
    keeps running). Built on first use: the ops exist once `kvsurgery.ops.register()` has run."""
    ops = torch.ops.kvsurgery
    always = lambda args: True  # noqa: E731
    return {
        ops.attend.default: (attend, always),
        ops.attend_accumulate_.default: (attend_accumulate_, always),
        ops.append_.default: (append_, always),
        ops.attend_quantized.default: (attend_quantized, lambda args: _lowerable_quantized(args[-2], args[-1])),
        ops.append_quantized_.default: (append_quantized_, lambda args: _has_residual(args[-1])),
    }


_PER_HEAD = {attend, attend_accumulate_, attend_quantized}  # lowerings with a per-head form (`uniform_heads`)


def lower_decode_ops(graph: fx.Graph) -> int:
    """Replace every kvsurgery op of `graph` that has a lowering by its aten ops, traced in place. Returns how many."""
    tracer = fx.proxy.GraphAppendingTracer(graph)
    lowered = 0
    for node in list(graph.nodes):
        fn, allowed = _lowerings().get(node.target, (None, None)) if node.op == "call_function" else (None, None)
        if fn is None or not allowed(node.args):
            continue
        kwargs = dict(node.kwargs)
        if fn in _PER_HEAD and node.meta.get(UNIFORM_HEADS):
            kwargs["uniform_heads"] = True
        with graph.inserting_before(node):
            args = [fx.Proxy(a, tracer) if isinstance(a, fx.Node) else a for a in node.args]
            out = fn(*args, **kwargs)
        if out is not None:
            node.replace_all_uses_with(out.node)
        graph.erase_node(node)
        lowered += 1
    return lowered
