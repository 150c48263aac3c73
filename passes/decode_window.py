"""`decode_window`: decode-time eviction for any scoring recipe (a fixed-capacity cache for long generation)."""

from __future__ import annotations

from dataclasses import dataclass

from kvsurgery.pass_base import Eviction, Pass
from kvsurgery.registry import register_pass


@register_pass
class DecodeWindow(Pass):
    """Fixed capacity while decoding: keeps the prompt's best-scored tokens and the last `window` decoded ones.

    Prompt tokens keep their prefill score; decoded tokens score 0, so once they leave the recent window they
    are evicted first, then the lowest-scored prompt tokens. E.g. 'snapkv+decode_window(window=64)'.
    """

    name = "decode_window"
    phase = "select"
    provides = frozenset({"decode_eviction"})
    requires = frozenset({"scores"})
    defaults = {"scores": "snapkv"}  # noqa: RUF012 (read-only class data)
    needs_budget = True

    @dataclass(frozen=True)
    class Options:
        window: int = 32  # most recent tokens never evicted

        def __post_init__(self):
            if self.window < 1:
                raise ValueError("window must be >= 1")

    def eviction(self) -> Eviction:
        return Eviction(window=self.options.window, by_score=True, score_new="zero")
