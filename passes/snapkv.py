"""`snapkv`: SnapKV token scores (Li et al., 2024, arXiv 2404.14469)."""

from __future__ import annotations

from dataclasses import dataclass

from kvsurgery.pass_base import Pass, Selection, SiteRewrite
from kvsurgery.registry import register_pass


@register_pass
class SnapKV(Pass):
    """SnapKV: scores tokens by the attention of the last `window` prompt queries (pooled); keeps the window."""

    name = "snapkv"
    phase = "score"
    provides = frozenset({"scores"})
    products = frozenset({"scores"})
    needs_budget = True

    @dataclass(frozen=True)
    class Options:
        window: int = 32  # observation window: its queries score the prefix, its tokens are always kept
        kernel: int = 5  # pooling kernel along the token axis (odd)
        pool: str = "avg"  # "avg" or "max"
        sinks: int = 0  # first tokens always kept

        def __post_init__(self):
            if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0 or self.sinks < 0:
                raise ValueError("window >= 1, an odd kernel >= 1 and sinks >= 0 are required")
            if self.pool not in ("avg", "max"):
                raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")

    def selection(self) -> Selection:
        return Selection(sinks=self.options.sinks, window=self.options.window)

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase == "prefill":
            o = self.options
            rw.products["scores"] = rw.op(
                self.name,
                "score_window",
                q=rw.q,
                k=rw.k,
                mask=rw.mask,
                scale=rw.match.attention.scale,
                window=o.window,
                kernel=o.kernel,
                pool=o.pool,
            )
