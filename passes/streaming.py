"""`streaming`: StreamingLLM (Xiao et al., 2024, arXiv 2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass

from kvsurgery.pass_base import Eviction, Pass, Selection, SiteRewrite
from kvsurgery.registry import register_pass


@register_pass
class StreamingLLM(Pass):
    """StreamingLLM: attention sinks plus the most recent tokens; evicts the oldest non-sink while decoding.

    Kept keys keep their original positions (the PyramidKV-repo one-shot variant), not re-indexed ones.
    """

    name = "streaming"
    phase = "score"
    provides = frozenset({"scores", "decode_eviction"})
    products = frozenset({"scores"})
    needs_budget = True

    @dataclass(frozen=True)
    class Options:
        sinks: int = 4  # first tokens always kept

        def __post_init__(self):
            if self.sinks < 0:
                raise ValueError("sinks must be >= 0")

    def selection(self) -> Selection:
        return Selection(sinks=self.options.sinks)

    def eviction(self) -> Eviction:
        return Eviction(sinks=self.options.sinks)

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase == "prefill":
            rw.products["scores"] = rw.op(self.name, "score_recency", k=rw.k)
