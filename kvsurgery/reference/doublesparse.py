"""Double Sparsity (Yang et al., 2024, arXiv 2408.07092; docs/doublesparse.md): the math of its ops.

Every token stays in the store. Each stored key also has a *label*: its values on the r offline-calibrated outlier
channels of each query head of its group (post-RoPE), optionally as per-token min-max codes of `bits` bits. A decode
step scores every stored token approximately from the labels, keeps the top k per KV head and runs exact attention
over those k tokens only.

Layouts (one layer), in addition to the store's (see `kvsurgery.reference.core`):
  channels     [Hq, r] int64                  outlier channels of each query head (from the calibration)
  labels       [B, S, G, r]      bfloat16      bits == 16: the raw label values
               [B, S, G, r*bits/8] uint8       bits in (2, 4, 8): packed codes, lowest bits first
  label_range  [B, S, G, 2]      float16       bits < 16: per-label (min, step); None when bits == 16
G = Hq / Hkv query heads per KV head; slot s of a KV head's segment holds one label per query head of the group.
The ops take the store as one `s: LayerTensors` (its labels and label_range beside the core tensors they read).

GQA: the k tokens are chosen per KV head, so the whole query group attends to the same tokens. Each query head
turns its approximate logits into a softmax; the group's summed probability mass ranks the tokens (for MHA this is
the reference's per-head top-k of q[C].k[C]). The current token is always selected.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvsurgery.budget import Budget
from kvsurgery.reference.core import NEG_INF, acc_dtype, group_queries, segment_slots, top_indices
from kvsurgery.store import LayerTensors

LABEL_BITS = (2, 4, 8, 16)


# -- labels: gather and (de)quantize ----------------------------------------------------------------
def label_width(r: int, bits: int) -> int:
    """Elements of one label in the `labels` plane: r values (16-bit) or r*bits/8 packed bytes."""
    return r if bits == 16 else r * bits // 8


def gather_channels(keys: Tensor, channels: Tensor) -> Tensor:
    """Keys [B, Hkv, N, D] on each query head's channels [Hq, r] -> raw labels [B, Hkv, N, G, r]."""
    b, n_kv, n, _ = keys.shape
    hq, r = channels.shape
    g = hq // n_kv
    index = channels.reshape(1, n_kv, 1, g * r).expand(b, n_kv, n, g * r).to(keys.device)
    return keys.gather(-1, index).reshape(b, n_kv, n, g, r)


def quantize_labels(x: Tensor, bits: int) -> tuple[Tensor, Tensor | None]:
    """Raw labels [..., r] -> (stored labels, label range or None): per-label asymmetric min-max codes, packed.

    The range (min, step) is stored as float16 and the codes are computed from those rounded values, so
    dequantization sees exactly what quantization used.
    """
    if bits == 16:
        return x.to(torch.bfloat16), None
    levels = 2**bits - 1
    xf = x.float()
    lo = xf.amin(-1, keepdim=True).half().float()
    step = ((xf.amax(-1, keepdim=True) - lo) / levels).half().float()
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((xf - lo) / step).round().clamp(0, levels).to(torch.uint8)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=x.device, dtype=torch.uint8) * bits
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = (grouped << shifts).sum(-1, dtype=torch.uint8)
    return packed, torch.cat([lo, step], dim=-1).half()


def dequantize_labels(labels: Tensor, label_range: Tensor | None, bits: int) -> Tensor:
    """Stored labels -> float32 label values [..., r]."""
    if bits == 16:
        return labels.float()
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=labels.device, dtype=torch.uint8) * bits
    codes = (labels[..., None] >> shifts) & (2**bits - 1)
    codes = codes.reshape(*labels.shape[:-1], labels.shape[-1] * per_byte).float()
    rng = label_range.float()
    return codes * rng[..., 1:2] + rng[..., 0:1]


def label_fill_(s: LayerTensors, channels: Tensor, bits: int) -> None:
    """Prefill: (re)write the label of every slot of every segment from the stored keys."""
    n_slots = s.k_store.shape[1]
    width = int(s.cap.max()) if s.cap.numel() else 0
    slots, rows = segment_slots(s.start, width, n_slots)
    in_seg = torch.arange(width, device=s.k_store.device) < s.cap.long()[..., None]
    stored, rng = quantize_labels(gather_channels(s.k_store[rows, slots], channels), bits)
    s.labels[rows[in_seg], slots[in_seg]] = stored[in_seg]
    if s.label_range is not None:
        s.label_range[rows[in_seg], slots[in_seg]] = rng[in_seg]


def label_append_(s: LayerTensors, k: Tensor, channels: Tensor, bits: int) -> None:
    """Decode: write the label of the new key k [B, Hkv, 1, D]. Runs after `append_`, which wrote the key at
    slot start + length - 1 of its (non-evicting) segment."""
    slot = (s.start.long() + s.length.long() - 1).clamp_min(0)
    rows = torch.arange(slot.shape[0], device=slot.device)[:, None].expand_as(slot)
    stored, rng = quantize_labels(gather_channels(k, channels)[:, :, 0], bits)
    s.labels[rows, slot] = stored
    if s.label_range is not None:
        s.label_range[rows, slot] = rng


# -- decode: approximate scores, top-k, exact attention over the selection ----------------------------------
def attended_tokens(keep: Tensor, tokens: int, fraction: float) -> Tensor:
    """k per batch row [B]: `tokens`, or `fraction` of the row's prompt (a sparse segment keeps its whole prompt)."""
    if tokens > 0:
        return torch.full((keep.shape[0],), tokens, dtype=torch.long, device=keep.device)
    budget = Budget(fraction=fraction)
    return torch.tensor([budget.resolve(int(n)) for n in keep.amax(-1).tolist()], device=keep.device)


def approximate_scores(
    q: Tensor, s: LayerTensors, channels: Tensor, scale: float, bits: int, width: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(score [B, Hkv, L], slots [B, Hkv, L], valid [B, Hkv, L]) over each segment's first L positions, L = `width`
    or else max(length) (read from the device).

    score = the query group's summed softmax of q[C].label * scale: its approximate attention mass. Invalid
    positions score -inf; the current token (pos == seen - 1) scores +inf so it is always selected.
    """
    n_kv = s.start.shape[1]
    max_len = width if width is not None else int(s.length.max()) if s.length.numel() else 0
    slots, rows = segment_slots(s.start, max_len, s.pos.shape[1])
    p = s.pos[rows, slots].long()
    valid = (torch.arange(max_len, device=s.pos.device) < s.length.long()[..., None]) & (p >= 0)
    rng = s.label_range[rows, slots] if s.label_range is not None else None
    lab = dequantize_labels(s.labels[rows, slots], rng, bits)  # [B, Hkv, L, G, r]
    dt = acc_dtype(q)
    qg = group_queries(q, n_kv)[:, :, :, 0]  # [B, Hkv, G, D]
    index = channels.reshape(1, n_kv, -1, channels.shape[1]).expand(q.shape[0], -1, -1, -1).to(q.device)
    q_lab = qg.gather(-1, index).to(dt)  # [B, Hkv, G, r]: each query head on its own channels
    logits = torch.einsum("bhgr,bhlgr->bhgl", q_lab, lab.to(dt)) * scale
    mass = torch.softmax(logits.masked_fill(~valid[:, :, None], NEG_INF), dim=-1).nan_to_num(0.0).sum(2)
    score = mass.masked_fill(~valid, NEG_INF)
    score = score.masked_fill(valid & (p == s.seen - 1), float("inf"))
    return score, slots, valid


def select_tokens(
    score: Tensor, slots: Tensor, valid: Tensor, k: Tensor, k_bound: int | None = None
) -> tuple[Tensor, Tensor]:
    """The top-k slots of each (row, KV head) by approximate score (ties: earliest), k [B] per row, in slot order:
    (slots [B, Hkv, W], ok [B, Hkv, W]) with W = min(`k_bound` or else max k, L); `ok` is False past a row's k or
    its valid tokens."""
    width = min(k_bound if k_bound is not None else int(k.max()), score.shape[-1])
    idx = top_indices(score, width)
    ok = valid.gather(-1, idx) & (torch.arange(width, device=idx.device) < k[:, None, None])
    order = torch.where(ok, idx, idx + score.shape[-1]).argsort(dim=-1)
    idx = idx.gather(-1, order)
    return slots.gather(-1, idx), ok.gather(-1, order)


def select_without_sync(
    q: Tensor, s: LayerTensors, channels: Tensor, scale: float, tokens: int, fraction: float, bits: int
) -> tuple[Tensor, Tensor]:
    """`sparse_attend`'s selection with static shapes and no host sync (CUDA graphs can capture it): the same chosen
    slots. Segments are scanned up to S / Hkv slots, the equal per-head capacity the doublesparse pass plans; a
    longer segment fails a device-side assertion instead of being cut."""
    width = s.pos.shape[1] // s.start.shape[1]
    torch._assert_async(
        (s.length <= width).all(), "sparse_attend on CUDA needs every segment within S / Hkv slots (equal capacities)"
    )
    score, slots, valid = approximate_scores(q, s, channels, scale, bits, width)
    keep = s.keep
    if tokens > 0:
        k, k_bound = torch.full((keep.shape[0],), tokens, dtype=torch.long, device=keep.device), tokens
    else:  # Budget(fraction).resolve on the device: max(1, ceil(fraction * prompt)), bounded by the segment width
        k = (keep.amax(-1).double() * fraction).ceil().clamp_min(1).long()
        k_bound = max(1, math.ceil(fraction * width))
    return select_tokens(score, slots, valid, k, k_bound)


def attend_selected(q: Tensor, k_store: Tensor, v_store: Tensor, slots: Tensor, ok: Tensor, scale: float) -> Tensor:
    """Exact attention of each query group over its KV head's selected slots -> [B, Hq, 1, D]."""
    b, hq = q.shape[:2]
    n_kv = slots.shape[1]
    rows = torch.arange(b, device=q.device)[:, None, None].expand_as(slots)
    dt = acc_dtype(q)
    keys, values = k_store[rows, slots].to(dt), v_store[rows, slots].to(dt)
    qg = group_queries(q, n_kv)[:, :, :, 0].to(dt)
    logits = torch.einsum("bhgd,bhkd->bhgk", qg, keys) * scale
    probs = torch.softmax(logits.masked_fill(~ok[:, :, None], NEG_INF), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgk,bhkd->bhgd", probs, values)
    return out.reshape(b, hq, 1, -1).to(q.dtype)


def sparse_attend(
    q: Tensor, s: LayerTensors, channels: Tensor, scale: float, tokens: int, fraction: float, bits: int
) -> Tensor:
    """Decode attention over the top-k tokens of each KV head by label score -> [B, Hq, 1, D]."""
    score, slots, valid = approximate_scores(q, s, channels, scale, bits)
    chosen, ok = select_tokens(score, slots, valid, attended_tokens(s.keep, tokens, fraction))
    return attend_selected(q, s.k_store, s.v_store, chosen, ok, scale)


# The channels reach the ops as a flat int list (a graph constant Inductor accepts), one row of r per query head.
def channel_table(channels: list[int], n_heads: int, device: torch.device) -> Tensor:
    return torch.tensor(channels, dtype=torch.long, device=device).reshape(n_heads, -1)
