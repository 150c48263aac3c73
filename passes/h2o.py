"""`h2o`: Heavy-Hitter Oracle (Zhang et al., 2023, arXiv 2306.14048)."""

from __future__ import annotations

from dataclasses import dataclass

from kvsurgery.pass_base import Eviction, Pass, Selection, SiteRewrite
from kvsurgery.registry import register_pass


@register_pass
class H2O(Pass):
    """H2O: keeps heavy hitters (attention accumulated over all queries) and a recent window; evicts while decoding."""

    name = "h2o"
    phase = "score"
    provides = frozenset({"scores", "decode_eviction"})
    products = frozenset({"scores"})
    needs_budget = True

    @dataclass(frozen=True)
    class Options:
        window: int = 8  # recent tokens always kept (the unified-repo one-shot variant uses 8)

        def __post_init__(self):
            if self.window < 0:
                raise ValueError("window must be >= 0")

    def selection(self) -> Selection:
        return Selection(window=self.options.window)

    def eviction(self) -> Eviction:
        return Eviction(window=self.options.window, by_score=True, score_new="zero", accumulate=True)

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase == "prefill":
            scale = rw.match.attention.scale
            rw.products["scores"] = rw.op(self.name, "score_accumulated", q=rw.q, k=rw.k, mask=rw.mask, scale=scale)
