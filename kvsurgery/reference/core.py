"""PyTorch reference of every kvsurgery op: the specification kernels and passes are tested against.

Layouts (one model layer):
  q            [B, Hq, Tq, D]      queries, after RoPE
  k, v         [B, Hkv, T, D]      new keys/values, after RoPE, not repeated to query heads
  mask         [B, 1, Tq, Tk]      the model's own attention mask (bool, or additive float), or None = causal
  store k/v    [B, S, D]           S slots per batch row; each KV head owns one contiguous segment
  pos          [B, S] int32        token index of each slot, -1 when empty
  slot_score   [B, S] float32      per-slot eviction score (empty tensor when the recipe needs none)
  keep         [B, Hkv] int32      tokens each (row, KV head) keeps at prefill (its budget)
  cap          [B, Hkv] int32      segment capacity: keep + room for decoded tokens
  start        [B, Hkv] int32      first slot of each segment
  length       [B, Hkv] int32      filled slots of each segment
  seen         [] int64            tokens written so far (prompt, padding included, plus decoded)
Token indices count positions in the (left-padded) input, as the model's masks do.
The ops that read or write the store take it as one `s: LayerTensors` (`kvsurgery.store`), holding the tensors
their op declares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery.reference.streaming import recency_scores
from kvsurgery.store import LayerTensors

NEG_INF = float("-inf")


def acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (tests), everything else computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def allowed_keys(mask: Tensor | None, row_start: int, row_stop: int, n_keys: int, batch: int) -> Tensor:
    """Which keys each query row may attend to, as bool [B, rows, Tk], from the model's mask (None = causal)."""
    if mask is None:
        q_idx = torch.arange(row_start, row_stop)[:, None]
        allowed = torch.arange(n_keys)[None, :] <= q_idx
        return allowed.expand(batch, -1, -1)
    rows = mask[:, 0, row_start:row_stop, :n_keys]
    if rows.dtype != torch.bool:
        rows = rows > torch.finfo(rows.dtype).min / 2
    return rows.expand(batch, -1, -1)


def valid_keys(mask: Tensor | None, n_keys: int, batch: int) -> Tensor:
    """Keys the last prompt query may see: excludes padding (and tokens outside a sliding window). [B, T]."""
    return allowed_keys(mask, n_keys - 1, n_keys, n_keys, batch)[:, 0]


def group_queries(q: Tensor, n_kv: int) -> Tensor:
    """[B, Hq, Tq, D] -> [B, Hkv, G, Tq, D]: query heads grouped by the KV head they read (GQA)."""
    b, hq, tq, d = q.shape
    return q.reshape(b, n_kv, hq // n_kv, tq, d)


def window_logits(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, window: int) -> Tensor:
    """Logits [B, Hkv, G, W, T] of the last W = min(window, T) queries against every key (accumulation dtype), keys a
    query may not see at -inf: what window scorers (SnapKV, CSP) take their softmax of."""
    b, _, t, _ = q.shape
    w = min(window, t)
    dt = acc_dtype(q)
    qw = group_queries(q[:, :, t - w :], k.shape[1]).to(dt)
    logits = torch.einsum("bhgwd,bhtd->bhgwt", qw, k.to(dt)) * scale
    allowed = allowed_keys(mask, t - w, t, t, b).to(q.device)
    return logits.masked_fill(~allowed[:, None, None], NEG_INF)


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores along the last axis; ties go to the earliest token (a stable sort), so
    the choice does not depend on padding or kernel order (max-pooled scores tie often)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def forced_keep(valid: Tensor, sinks: int, window: int) -> Tensor:
    """Tokens always kept [B, T]: the first `sinks` and the last `window` valid tokens of each row."""
    rank = valid.long().cumsum(-1) - 1
    n_valid = valid.sum(-1, keepdim=True)
    return valid & ((rank < sinks) | (rank >= n_valid - window))


def largest_remainder(target: Tensor, total: Tensor) -> Tensor:
    """Round non-negative reals [B, H] to ints that sum exactly to `total` [B] (largest-remainder method)."""
    base = target.floor()
    deficit = (total - base.sum(-1)).round().long()
    order = torch.argsort(target - base, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (base + (rank < deficit[:, None]).to(base.dtype)).long()


def segment_slots(start: Tensor, width: int, n_slots: int) -> tuple[Tensor, Tensor]:
    """Slot index [B, Hkv, width] of each segment position (clamped in range) and the batch index for gathers."""
    j = torch.arange(width, device=start.device)
    slots = (start.long()[..., None] + j).clamp(max=n_slots - 1)
    rows = torch.arange(start.shape[0], device=start.device)[:, None, None].expand_as(slots)
    return slots, rows


def select_compact_(
    s: LayerTensors,
    k: Tensor,
    v: Tensor,
    scores: Tensor | None,
    budgets: Tensor | None,
    mask: Tensor | None,
    sinks: int,
    window: int,
) -> None:
    """Prefill: keep sinks + recent window + top-scored tokens of each (row, KV head) and compact them into its segment.

    `budgets` [B, Hkv] re-plans the segments with per-head budgets decided at run time (Ada-KV), keeping each
    segment's decode room (cap - keep); otherwise the planned `keep` is used. Kept tokens are stored in position
    order; a segment's unused slots get pos = -1.
    """
    b, n_kv, t, _ = k.shape
    n_slots = s.k_store.shape[1]
    if budgets is not None:
        seg = budgets.to(s.cap.dtype) + (s.cap - s.keep)
        s.keep.copy_(budgets)
        s.cap.copy_(seg)
        s.start.copy_(seg.cumsum(-1) - seg)
    budget = s.keep.long()
    valid = valid_keys(mask, t, b).to(k.device)
    forced = forced_keep(valid, sinks, window)
    prio = scores.float() if scores is not None else recency_scores(k)
    prio = prio.masked_fill(forced[:, None], float("inf")).masked_fill(~valid[:, None], NEG_INF)
    width = int(min(t, budget.max().item())) if budget.numel() else 0
    count = torch.minimum(budget, valid.sum(-1, keepdim=True)).clamp_min(0)
    idx = top_indices(prio, width)
    j = torch.arange(width, device=k.device)
    taken = j < count[..., None]
    idx = torch.where(taken, idx, t).sort(dim=-1).values
    slots, rows = segment_slots(s.start, width, n_slots)
    heads = torch.arange(n_kv, device=k.device)[None, :, None].expand_as(slots)
    bi, hi, si, ti = rows[taken], heads[taken], slots[taken], idx[taken]
    s.pos.fill_(-1)
    s.pos[bi, si] = ti.to(s.pos.dtype)
    s.k_store[bi, si] = k[bi, hi, ti]
    s.v_store[bi, si] = v[bi, hi, ti]
    if s.slot_score.numel():
        s.slot_score.zero_()
        kept_score = scores[bi, hi, ti] if scores is not None else ti.float()
        s.slot_score[bi, si] = kept_score.float()
    s.length.copy_(count.to(s.length.dtype))
    s.seen.fill_(t)


def _segment_view(pos: Tensor, start: Tensor, cap: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    max_cap = int(cap.max()) if cap.numel() else 0
    slots, rows = segment_slots(start, max_cap, pos.shape[1])
    in_seg = torch.arange(max_cap, device=pos.device) < cap.long()[..., None]
    p = torch.where(in_seg, pos[rows, slots].long(), -1)
    return slots, rows, p


def append_(
    s: LayerTensors,
    k: Tensor,
    v: Tensor,
    sinks: int,
    window: int,
    evict: bool,
    by_score: bool,
    score_new: str,
) -> None:
    """Decode: write one new token per (row, KV head) into its segment, evicting one token when it is full.

    The victim is the lowest `slot_score` (`by_score`) or else the oldest token, among tokens that are neither
    one of the `sinks` earliest nor among the `window` most recent. Without `evict` the caller guarantees room.
    The new token's slot score is its index (`score_new="position"`) or 0 (`"zero"`, accumulated later).
    """
    slots, rows, p = _segment_view(s.pos, s.start, s.cap)
    filled = p >= 0
    new_slot = s.start.long() + s.length.long()
    full = s.length >= s.cap
    if evict:
        score = s.slot_score[rows, slots] if by_score else p.float()
        big = torch.iinfo(torch.int64).max
        n_sink = max(1, min(sinks, slots.shape[-1]))
        sink_cut = torch.where(filled, p, big).topk(n_sink, dim=-1, largest=False).values[..., -1:]
        is_sink = filled & (p <= sink_cut) if sinks > 0 else torch.zeros_like(filled)
        recent = p >= s.seen - window
        cand = filled & ~is_sink & ~recent
        cand = torch.where(cand.any(-1, keepdim=True), cand, filled & ~is_sink)
        cand = torch.where(cand.any(-1, keepdim=True), cand, filled)
        victim = torch.where(cand, score, float("inf")).argmin(dim=-1)
        new_slot = torch.where(full, slots.gather(-1, victim[..., None])[..., 0], new_slot)
    b_idx = rows[..., 0]
    s.k_store[b_idx, new_slot] = k[:, :, 0]
    s.v_store[b_idx, new_slot] = v[:, :, 0]
    s.pos[b_idx, new_slot] = s.seen.to(s.pos.dtype)
    if s.slot_score.numel():
        s.slot_score[b_idx, new_slot] = s.seen.float() if score_new == "position" else 0.0
    s.length.copy_(torch.where(full, s.length, s.length + 1))
    s.seen.add_(1)


def gather_segments(s: LayerTensors, window: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Each segment's filled slots (k_store, v_store, pos, start, length, seen): keys and values [B, Hkv, L, D],
    which may attend [B, Hkv, L] (filled, within the sliding `window` when > 0), and their slots and rows."""
    max_len = int(s.length.max()) if s.length.numel() else 0
    slots, rows = segment_slots(s.start, max_len, s.k_store.shape[1])
    p = s.pos[rows, slots].long()
    ok = (torch.arange(max_len, device=s.pos.device) < s.length.long()[..., None]) & (p >= 0)
    if window > 0:
        ok = ok & (p > s.seen - 1 - window)
    return s.k_store[rows, slots], s.v_store[rows, slots], ok, slots, rows


def attend(q: Tensor, s: LayerTensors, scale: float, window: int) -> Tensor:
    """Decode attention of one query token per head over the compressed store -> [B, Hq, 1, D].

    `seen` counts the current token (append ran first); `window` > 0 restricts keys to the sliding window.
    """
    return _attend(q, s, scale, window)[0]


def _attend(q: Tensor, s: LayerTensors, scale: float, window: int):
    b, hq, _, d = q.shape
    n_kv = s.start.shape[1]
    dt = acc_dtype(q)
    keys, values, ok, slots, rows = gather_segments(s, window)
    qg = group_queries(q, n_kv)[:, :, :, 0].to(dt)
    logits = torch.einsum("bhgd,bhld->bhgl", qg, keys.to(dt)) * scale
    probs = torch.softmax(logits.masked_fill(~ok[:, :, None], NEG_INF), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgl,bhld->bhgd", probs, values.to(dt))
    return out.reshape(b, hq, 1, d).to(q.dtype), probs, ok, slots, rows


def attend_accumulate_(q: Tensor, s: LayerTensors, scale: float, window: int) -> Tensor:
    """`attend`, and add each slot's attention (mean over its GQA group) to `slot_score` (H2O bookkeeping)."""
    out, probs, ok, slots, rows = _attend(q, s, scale, window)
    gain = probs.mean(dim=2).float().masked_fill(~ok, 0.0)
    s.slot_score.index_put_((rows[ok], slots[ok]), gain[ok], accumulate=True)
    return out


def dense_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Plain masked attention (test oracle): q [B,Hq,Tq,D], k/v [B,Hkv,T,D], allowed [B,Hkv|1,Tq,T] bool."""
    n_kv = k.shape[1]
    dt = acc_dtype(q)
    qg = group_queries(q, n_kv).to(dt)
    logits = torch.einsum("bhgqd,bhtd->bhgqt", qg, k.to(dt)) * scale
    probs = torch.softmax(logits.masked_fill(~allowed[:, :, None], NEG_INF), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgqt,bhtd->bhgqd", probs, v.to(dt))
    return out.reshape(q.shape).to(q.dtype)
