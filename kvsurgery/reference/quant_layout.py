"""Where a quantized layer keeps its tokens: a packed region and a small full-precision region per KV head.

Per layer and batch row, each KV head owns two contiguous segments:
  packed region  slots [q_start, q_start + q_cap) of the planes `qk_codes`/`qv_codes` (uint8, bits * D / 8 bytes a
                 token) with their (scale, lo) rows in `qk_scale`/`qk_low`/`qv_scale`/`qv_low` (the model's dtype);
                 `q_len` tokens filled, in position order. No position index is stored for them (attention does not
                 need one), so packed tokens cost only their codes and statistics.
  dense region   the store's own k/v/pos tensors, reduced to `dense_slots` slots; the core tables `start`, `cap`,
                 `length` describe it exactly as they describe an ordinary store. `keep` stays the head's budget.
Two policies fill them:
  residual > 0   KIVI: the newest tokens stay in full precision until the dense segment holds `residual` tokens;
                 then, before a new token enters, its oldest `flush` tokens are quantized as one group.
  residual == 0  CalibQuant: the prompt's kept tokens are quantized at prefill except the `recent` ones kept in full
                 precision (text before visual tokens when a modality mask is known); decoded tokens stay dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvsurgery.reference.quant_codes import QuantSpec
from kvsurgery.store import Plane


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class QuantLayout:
    """The quantizers of K and V and the dense-region policy of one quantized layer."""

    k: QuantSpec
    v: QuantSpec
    residual: int = 0  # KIVI full-precision residual (> 0: flush `flush` tokens when it is full)
    recent: int = 0  # CalibQuant policy: kept prompt tokens left in full precision

    def __post_init__(self):
        if self.residual < 0 or self.recent < 0:
            raise ValueError("residual and recent must be >= 0")
        if self.residual:
            if any(s.axis == "channel" and s.group == 0 for s in (self.k, self.v)):
                raise ValueError("a flushed residual needs token groups of a fixed size (group > 0)")
            if self.residual % self.align:
                raise ValueError(f"residual {self.residual} must be a multiple of the group size {self.align}")

    @property
    def align(self) -> int:
        """Tokens per channel-axis group (packed segments start on a group boundary); 1 without token groups."""
        sizes = [s.group for s in (self.k, self.v) if s.axis == "channel" and s.group > 0]
        return math.lcm(*sizes) if sizes else 1

    @property
    def flush(self) -> int:
        return self.align if self.residual else 0

    def text(self) -> str:
        return f"{self.k.text()};{self.v.text()};{self.residual};{self.recent}"

    @staticmethod
    def parse(text: str) -> QuantLayout:
        k, v, residual, recent = text.split(";")
        return QuantLayout(QuantSpec.parse(k), QuantSpec.parse(v), int(residual), int(recent))

    # -- per-head capacities ---------------------------------------------------------------------------
    def packed_at_prefill(self, kept):
        """Tokens of `kept` prompt tokens that are quantized at prefill (int or int tensor)."""
        if self.residual:
            over = _clamp0(kept - self.residual)
            return -(-over // self.flush) * self.flush
        return _clamp0(kept - self.recent)

    def capacities(self, kept, room: int):
        """(packed slots, dense slots) a head with `kept` prompt tokens needs for `room` decoded tokens."""
        if self.residual:
            total = kept + room
            packed = -(-_clamp0(total - self.residual) // self.flush) * self.flush
            dense = _min(total, self.residual)
        else:
            packed = self.packed_at_prefill(kept)
            dense = kept - packed + room
        return -(-packed // self.align) * self.align, dense

    def allocation(self, keep: list[int], room: int, shared: bool) -> tuple[int, int]:
        """Packed and dense slots of one row. `shared`: per-head budgets are only decided at prefill (Ada-KV), the
        row total staying sum(keep); the bound then covers any split of it among the heads."""
        if not shared:
            caps = [self.capacities(n, room) for n in keep]
            return sum(c[0] for c in caps), sum(c[1] for c in caps)
        total, heads = sum(keep), len(keep)
        # packed(n) is max(0, n + offset) rounded up to the alignment: convex, so largest when one head owns all
        offset = room - self.residual if self.residual else -self.recent
        packed = max(0, total + offset) + (heads - 1) * max(0, offset) + heads * (self.align - 1)
        if self.residual:
            dense = min(heads * self.residual, total + heads * room)
        else:
            dense = min(heads * self.recent, total) + heads * room
        return _ceil_to(packed, self.align), dense

    # -- store planes ---------------------------------------------------------------------------------
    def planes(self, n_kv: int, packed: int, head_dim: int, v_head_dim: int) -> list[Plane]:
        """The extra store tensors of a layer with `packed` packed slots per row (stats in the model's dtype)."""
        planes = []
        for prefix, spec, dim in (("qk", self.k, head_dim), ("qv", self.v, v_head_dim)):
            rows, width = self.stats_rows(spec, n_kv, packed, dim)
            planes += [
                Plane(f"{prefix}_codes", (spec.packed_width(dim),), torch.uint8, rows=packed),
                Plane(f"{prefix}_scale", (width,), None, rows=rows),
                Plane(f"{prefix}_low", (width,), None, rows=rows),
            ]
        planes += [Plane(name, (), torch.int32, rows=n_kv) for name in ("q_start", "q_cap", "q_len")]
        return planes

    @staticmethod
    def stats_rows(spec: QuantSpec, n_kv: int, packed: int, dim: int) -> tuple[int, int]:
        """(rows, values per row) of a spec's scale/lo planes: per token, per token group, or per KV head."""
        if spec.axis == "token":
            return packed, dim // spec.group
        return (n_kv if spec.group == 0 else packed // spec.group), dim

    def describe(self) -> str:
        def one(spec: QuantSpec) -> str:
            if spec.axis == "token":
                groups = f"per token, groups of {spec.group} channels"
            else:
                groups = "per channel over " + (f"groups of {spec.group} tokens" if spec.group else "the whole span")
            rng = f"quantile {spec.alpha:g}" if spec.range == "quantile" and spec.alpha > 0 else "min-max"
            shrink = f" x{spec.shrink:g}" if spec.shrink != 1.0 else ""
            return f"{spec.bits}-bit {groups}, {rng}{shrink}"

        dense = (
            f"full-precision residual of {self.residual} (flushed {self.flush} at a time)"
            if self.residual
            else f"the {self.recent} most recent prompt tokens and decoded tokens in full precision"
        )
        return f"packed K {one(self.k)}; V {one(self.v)}; {dense}"


def _clamp0(x):
    return x.clamp_min(0) if isinstance(x, torch.Tensor) else max(0, x)


def _min(x, limit: int):
    return x.clamp_max(limit) if isinstance(x, torch.Tensor) else min(x, limit)
