"""`csp`: Cross-Self KV cache pruning for vision-language models (Pei et al., 2024); docs/csp.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsurgery.modality import visual_mask, visual_token_ids
from kvsurgery.pass_base import Pass, Selection, SiteRewrite
from kvsurgery.registry import register_pass


@register_pass
class CSP(Pass):
    """CSP: keeps a recent window plus separate top-k budgets of intra- and inter-modality (n-softmax) attention."""

    name = "csp"
    phase = "score"
    provides = frozenset({"scores"})
    products = frozenset({"scores", "is_visual"})
    needs_budget = True

    @dataclass(frozen=True)
    class Options:
        window: int = 32  # observation window: its queries score the prompt, its tokens are always kept
        cross_ratio: float = 0.5  # share of the selected (non-window) tokens chosen by cross-modality score
        n: int = 1  # n of the n-softmax (0 = ordinary softmax)

        def __post_init__(self):
            if self.window < 1 or self.n < 0 or not 0.0 <= self.cross_ratio <= 1.0:
                raise ValueError("window >= 1, n >= 0 and cross_ratio in [0, 1] are required")

    def selection(self) -> Selection:
        return Selection(window=self.options.window)

    def check_model(self, model: torch.nn.Module, recipe) -> list[int]:
        """The model's image token ids (from its config)."""
        return visual_token_ids(model, self.name)

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase != "prefill":
            return
        o = self.options
        is_visual = visual_mask(rw.graph, rw.recipe.state(self), self.name)
        rw.products["is_visual"] = is_visual
        rw.inserted.setdefault(self.name, []).append("is_visual(input_ids)")
        rw.products["scores"] = rw.op(
            self.name,
            "score_csp",
            q=rw.q,
            k=rw.k,
            mask=rw.mask,
            is_visual=is_visual,
            keep=rw.store["keep"],
            scale=rw.match.attention.scale,
            window=o.window,
            cross_ratio=o.cross_ratio,
            n=o.n,
        )
