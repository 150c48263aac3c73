"""PyTorch reference of PrefixKV's ops (arXiv 2412.03409; docs/prefixkv.md), the specification of its ops.

Store layout as in `kvsurgery.reference.core`: per batch row, each KV head owns the slots [start, start + cap), of
which the first `length` are filled (in any position order). The decode op takes the store as one `s: LayerTensors`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery.reference.h2o import accumulated_scores
from kvsurgery.store import LayerTensors


def layer_scores(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """PrefixKV importance [B, Hkv, T]: attention each key receives summed over all prompt queries, averaged over
    every query head of the layer; the same row for every KV head, so all heads keep the same tokens."""
    per_kv = accumulated_scores(q, k, mask, scale)  # mean over each KV head's query group
    return per_kv.mean(dim=1, keepdim=True).expand_as(per_kv).contiguous()


def anchor_index(keep: Tensor, distance: int) -> Tensor:
    """Cache index tokens leave through: `keep + distance` (keep = tokens kept at prefill), or keep // 2 when that is
    below 1 (the reference code's rule)."""
    anchor = keep.long() + distance
    return torch.where(anchor >= 1, anchor, keep.long() // 2)


def _delete_anchor(s: LayerTensors, where: Tensor, distance: int) -> None:
    """Delete, in segments where `where` [B, Hkv] holds, the token at cache index `anchor` (tokens in position
    order, clamped to the last one). The segment's last filled slot moves into the freed slot, so filled slots stay
    contiguous. No host synchronisation (fixed shapes, no boolean indexing)."""
    pos, length = s.pos, s.length
    b_sz, n_slots = pos.shape
    slot_ids = torch.arange(n_slots, device=pos.device)
    first, count = s.start.long()[..., None], length.long()[..., None]
    filled = (slot_ids >= first) & (slot_ids < first + count)  # [B, Hkv, S]
    key = torch.where(filled, pos[:, None, :].long(), torch.iinfo(torch.int64).max)
    order = key.argsort(dim=-1, stable=True)  # the segment's slots by position, then the rest
    rank = torch.minimum(anchor_index(s.keep, distance), length.long() - 1).clamp_min(0)
    victim = order.gather(-1, rank[..., None])[..., 0]  # [B, Hkv]
    last = (s.start.long() + length.long() - 1).clamp_min(0)
    delete = where & (length > 0)
    rows = torch.arange(b_sz, device=pos.device)[:, None].expand_as(victim)
    for store in (s.k_store, s.v_store):
        store[rows, victim] = torch.where(delete[..., None], store[rows, last], store[rows, victim])
    pos[rows, victim] = torch.where(delete, pos[rows, last], pos[rows, victim])
    if s.slot_score.numel():
        s.slot_score[rows, victim] = torch.where(delete, s.slot_score[rows, last], s.slot_score[rows, victim])
    pos[rows, last] = torch.where(delete, -1, pos[rows, last])
    length.sub_(delete.to(length.dtype))


def append_anchor_(s: LayerTensors, k: Tensor, v: Tensor, ratio: float, distance: int) -> None:
    """Decode step of PrefixKV (the Elastic-Cache fixed-point rule): append the new token, then, when the segment
    holds more than its share, delete one token at the anchor index.

    With n = the row's tokens so far (prompt without padding + decoded, the new one included) and len the cached
    tokens after the append, one token leaves when int(len - n * (1 - ratio)) > 0, so each layer keeps about
    1 - ratio of the sequence. n is counted from the row's first cached position: PrefixKV always keeps the first
    token (sinks >= 1), which is the row's first non-padding token. A segment that is already full (never with the
    room `prefixkv` plans) first deletes its anchor token so the write cannot overflow.
    """
    _delete_anchor(s, s.length >= s.cap, distance)
    pos, seen = s.pos, s.seen
    rows = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(s.start)
    new_slot = s.start.long() + s.length.long()
    s.k_store[rows, new_slot] = k[:, :, 0]
    s.v_store[rows, new_slot] = v[:, :, 0]
    pos[rows, new_slot] = seen.to(pos.dtype)
    if s.slot_score.numel():
        s.slot_score[rows, new_slot] = seen.float()
    s.length.add_(1)
    first_pos = torch.where(pos >= 0, pos.long(), torch.iinfo(torch.int64).max).amin(dim=-1)  # [B]
    n = (seen + 1 - first_pos).double()[:, None]
    over = (s.length.double() - n * (1.0 - ratio)).trunc() > 0
    _delete_anchor(s, over, distance)
    seen.add_(1)
