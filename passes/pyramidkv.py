"""`pyramidkv`: PyramidKV per-layer budgets (Cai et al., 2024, arXiv 2406.02069)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvsurgery.pass_base import Pass, PlanState
from kvsurgery.registry import register_pass


def pyramid_budgets(budget: int, window: int, prompt_len: int, n_layers: int, beta: int) -> list[int]:
    """Tokens kept per layer (window included): a linear pyramid from layer 0 (most) to the last (least).

    The average selected part is budget - window; the first layer keeps k_max, the last about k_min.
    Prompts too short for a pyramid get the uniform budget (as the reference implementation does).
    """
    b_avg = budget - window
    k_min = b_avg // beta
    k_max = 2 * b_avg - k_min
    if prompt_len - window < k_max or n_layers == 1:
        return [budget] * n_layers
    step = (k_max - k_min) // (n_layers - 1)
    return [k_max - layer * step + window for layer in range(n_layers)]


@register_pass
class PyramidKV(Pass):
    """PyramidKV: SnapKV selection with per-layer budgets shrinking linearly with depth (a pyramid)."""

    name = "pyramidkv"
    phase = "budget"
    provides = frozenset({"budget"})
    requires = frozenset({"scores"})
    defaults: ClassVar[dict[str, str]] = {"scores": "snapkv(window=8,kernel=7,pool=max)"}
    needs_budget = True

    @dataclass(frozen=True)
    class Options:
        beta: int = 20  # k_min = average budget // beta

        def __post_init__(self):
            if self.beta < 1:
                raise ValueError("beta must be >= 1")

    def plan_layer(self, state: PlanState) -> None:
        budgets = pyramid_budgets(
            state.budget, state.selection.window, state.prompt_len, state.n_layers, self.options.beta
        )
        state.keep = [budgets[state.site.layer]] * state.site.n_kv_heads
