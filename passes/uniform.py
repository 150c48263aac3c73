"""`uniform`: the same budget for every layer and KV head."""

from __future__ import annotations

from typing import ClassVar

from kvsurgery.pass_base import Pass, PlanState
from kvsurgery.registry import register_pass


@register_pass
class Uniform(Pass):
    """Uniform budgets: every layer and KV head keeps `budget` tokens (the default for scoring passes)."""

    name = "uniform"
    phase = "budget"
    provides = frozenset({"budget"})
    requires = frozenset({"scores"})
    defaults: ClassVar[dict[str, str]] = {"scores": "snapkv"}
    needs_budget = True

    def plan_layer(self, state: PlanState) -> None:
        state.keep = [state.budget] * state.site.n_kv_heads
