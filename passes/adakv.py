"""`adakv`: Ada-KV adaptive per-head budgets (Feng et al., 2024, arXiv 2407.11550)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvsurgery.pass_base import Pass, SiteRewrite
from kvsurgery.registry import register_pass


@register_pass
class AdaKV(Pass):
    """Ada-KV: a layer's budget is shared among its KV heads by a global top-k of their scores (20% floor)."""

    name = "adakv"
    phase = "budget"
    provides = frozenset({"budget"})
    products = frozenset({"budgets"})
    requires = frozenset({"scores"})
    defaults: ClassVar[dict[str, str]] = {"scores": "snapkv(window=8,kernel=7,pool=max)"}
    needs_budget = True
    dynamic_budgets = True

    @dataclass(frozen=True)
    class Options:
        floor: float = 0.2  # each head keeps at least floor * (its uniform share)
        normalize: bool = True  # rescale each head's scores by its top-b mass (HeadKV's Ada-SnapKV baseline)

        def __post_init__(self):
            if not 0.0 <= self.floor <= 1.0:
                raise ValueError("floor must be in [0, 1]")

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase == "prefill":
            sel, o = rw.recipe.selection, self.options
            rw.products["budgets"] = rw.op(
                self.name,
                "budget_adakv",
                scores=rw.products["scores"],
                mask=rw.mask,
                keep=rw.store["keep"],
                sinks=sel.sinks,
                window=sel.window,
                floor=o.floor,
                normalize=o.normalize,
            )
