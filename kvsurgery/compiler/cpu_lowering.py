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
- KIVI's packed region is attended by a C++ kernel (`kvsurgery::attend_packed`,
  `kvsurgery.kernels.cpu_packed_attention`) that dequantizes the codes inside its logit and value loops, so no
  dequantized copy is written; it returns each query head's log-sum-exp beside its output, and aten ops merge the
  dense region into the same softmax. Written in aten ops, the dequantization either wrote a float copy of every
  packed slot for two matmuls to read (1 MB a KV head for K and as much for V at SmolLM2-135M's 4K shape), or,
  placed inside the reductions, gave Inductor kernels that redo the unpacking per query head and plane. One layer
  at that shape, compiled alone (2-core box, 2026-12-03): 0.27-0.34 ms with the kernel, 0.62-0.70 ms with the copy
  in the same three rounds; inside the reductions, 1.43 ms in an earlier harness (docs/kernels.md). Those aten
  ops were also most of what a KIVI graph added to the compile time: SmolLM2-135M truncated to 4 layers, empty
  Inductor cache, compiled kivi2 in 51 s with them, 36 s with the kernel, and `full` in 29 s;
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
from kvsurgery.kernels import cpu_packed_attention
from kvsurgery.reference.quant_codes import compute_dtype
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


def _dense_inputs(q, k_store, v_store, pos, start, length, seen, window: int, uniform_heads: bool, dt: torch.dtype):
    """The dense store as attention inputs (queries, keys, values, allowed, ok), `ok` [B, Hkv, slots] the slots each
    KV head attends to. Where the KV heads own equal segments, each query group gets its own head's segment only (a
    third of the multiply-adds at 3 KV heads): queries [B Hkv, G, D], keys and values [B Hkv, S / Hkv, D], allowed
    [B Hkv, 1, S / Hkv]. Otherwise every query head gets the whole store, masked to its KV head's segment: queries
    [B, Hq, D], keys and values [B, S, D], allowed [B, Hq, S]."""
    b, hq, _, d = _value(q).shape
    n_kv = _value(start).shape[1]
    g, device = hq // n_kv, _value(q).device
    if uniform_heads:
        _check_uniform(start, k_store.size(1), n_kv, device, "full-precision")
        p = pos.unflatten(1, (n_kv, -1))
        ok = (_arange(start, p.size(-1), device) < length[..., None]) & (p >= 0)
        if window > 0:
            ok = ok & (p > seen - 1 - window)
        k, v = (_per_head(t, n_kv).to(dt) for t in (k_store, v_store))
        return q.reshape(b * n_kv, g, d).to(dt), k, v, ok.reshape(b * n_kv, 1, -1), ok
    ok = segment_slots(start, length, k_store.size(1), device) & (pos >= 0)[:, None, :]
    if window > 0:
        ok = ok & (pos > seen - 1 - window)[:, None, :]
    allowed = ok[:, :, None, :].expand(-1, -1, g, -1).reshape(b, hq, -1)
    return q.reshape(b, hq, d).to(dt), k_store.to(dt), v_store.to(dt), allowed, ok


def _attend_dense(q, k_store, v_store, pos, start, length, seen, scale: float, window: int, uniform_heads: bool):
    """Decode attention over the dense store (`_dense_inputs`) -> (out [B, Hq, 1, D], probs [B, Hkv, G, slots], ok)."""
    b, hq, _, _ = _value(q).shape
    n_kv = _value(start).shape[1]
    dt = _acc(_value(q).dtype)
    qf, k, v, allowed, ok = _dense_inputs(q, k_store, v_store, pos, start, length, seen, window, uniform_heads, dt)
    out, probs = _masked_attention(qf, k, v, allowed, scale)
    return out.reshape(b, hq, 1, -1).to(_value(q).dtype), probs.reshape(b, n_kv, hq // n_kv, -1), ok


def attend(q, k_store, v_store, pos, start, length, seen, scale, window, uniform_heads=False):
    """Lowered `kvsurgery::attend`."""
    return _attend_dense(q, k_store, v_store, pos, start, length, seen, scale, window, uniform_heads)[0]


def attend_accumulate_(q, k_store, v_store, pos, slot_score, start, length, seen, scale, window, uniform_heads=False):
    """Lowered `kvsurgery::attend_accumulate_`: each slot gains its group's mean attention (zero off the group)."""
    out, probs, ok = _attend_dense(q, k_store, v_store, pos, start, length, seen, scale, window, uniform_heads)
    gain = probs.mean(dim=2).float().masked_fill(~ok, 0.0)
    if uniform_heads:  # slot h * (S / Hkv) + j of the store is slot j of head h
        slot_score.add_(gain.flatten(1))
    else:  # [B, Hkv, S]; a slot is in one head's segment only
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


def _packed_by_kernel(q, qk_codes, qk_scale, qk_low, qv_codes, qv_scale, qv_low, q_start, q_len, scale: float,
                      layout: str):  # fmt: skip
    """(output [B, Hq, D], log-sum-exp [B, Hq, 1]) of the packed region, by the C++ kernel (`attend_packed`), which
    dequantizes inside its loops: nothing of the size of the packed region is written."""
    b, hq, _, d = _value(q).shape
    args = (q.reshape(b, hq, d), qk_codes, qk_scale, qk_low, qv_codes, qv_scale, qv_low, q_start, q_len, scale, layout)
    op = torch.ops.kvsurgery.attend_packed.default
    out = q.tracer.create_proxy("call_function", op, args, {}) if isinstance(q, fx.Proxy) else op(*args)
    return out[0], out[1][..., None]


def _with_dense(o_p, lse_p, qf, k, v, allowed, scale: float):
    """One softmax over the packed region, given as its normalised output o_p [R, G, D] and log-sum-exp lse_p
    [R, G, 1], and the dense slots k, v [R, S, D] (`allowed` broadcast to [R, G, S]) -> [R, G, D]. A query with no
    key at all gets zeros."""
    dense = (torch.matmul(qf, k.transpose(1, 2)) * scale).masked_fill(~allowed, NEG_INF)
    lse = torch.logaddexp(lse_p, torch.logsumexp(dense, dim=-1, keepdim=True))
    return (torch.exp(lse_p - lse) * o_p + torch.matmul(torch.exp(dense - lse), v)).nan_to_num(0.0)


def attend_quantized(q, k_store, v_store, pos, start, length, seen, qk_codes, qk_scale, qk_low, qv_codes, qv_scale,
                     qv_low, q_start, q_len, scale, layout, squeeze, uniform_heads=False):  # fmt: skip
    """Lowered `kvsurgery::attend_quantized` (layouts `cpu_packed_attention.supported` serves): the packed region by
    the C++ kernel, then one softmax with the dense region (`_dense_inputs`) in aten ops."""
    b, hq, _, _ = _value(q).shape
    n_kv = _value(start).shape[1]
    dt = compute_dtype(_value(q))
    o_p, lse_p = _packed_by_kernel(q, qk_codes, qk_scale, qk_low, qv_codes, qv_scale, qv_low, q_start, q_len, scale,
                                   layout)  # fmt: skip
    qf, k, v, allowed, _ = _dense_inputs(q, k_store, v_store, pos, start, length, seen, 0, uniform_heads, dt)
    rows = (b * n_kv, hq // n_kv) if uniform_heads else (b, hq)  # the queries' leading dims in `_dense_inputs`
    out = _with_dense(o_p.reshape(*rows, -1), lse_p.reshape(*rows, 1), qf, k, v, allowed, scale)
    return out.reshape(b, hq, 1, -1).to(_value(q).dtype)


def _kernel_serves(args) -> bool:
    """Whether the packed-region kernel serves an `attend_quantized` call (its layout and dtype), without logit
    squeezing (CalibQuant); otherwise the reference op stays in the graph."""
    q, layout, squeeze = args[0].meta["example_value"], args[-2], args[-1]
    return squeeze <= 0 and cpu_packed_attention.supported(QuantLayout.parse(layout), q.shape[-1], q.dtype)


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
        ops.attend_quantized.default: (attend_quantized, _kernel_serves),
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
