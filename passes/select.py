"""`select` (core): writes the kept tokens into the store at prefill, appends them at decode."""

from __future__ import annotations

from kvsurgery.pass_base import OLDEST_FIRST, Eviction, Pass, PlanState, SiteRewrite, kv_op
from kvsurgery.registry import register_pass
from kvsurgery.sites import AttentionSite


def layer_eviction(recipe, site: AttentionSite) -> Eviction | None:
    """Sliding-window layers always drop their oldest token; other layers follow the recipe."""
    return OLDEST_FIRST if site.sliding_window else recipe.eviction


@register_pass
class Select(Pass):
    """Compacts kept tokens into the store at prefill; appends one token per step (evicting when full) at decode."""

    name = "select"
    phase = "select"
    core = True
    provides = frozenset({"select"})

    def plan_layer(self, state: PlanState) -> None:
        site = state.site
        state.eviction = layer_eviction(state.recipe, site)
        if site.sliding_window:
            window = site.sliding_window
            state.keep = [min(k if state.budget is not None else window, window) for k in state.keep]
        elif state.eviction is None:
            state.keep = [min(k, state.prompt_len) for k in state.keep]
            state.room = state.max_new_tokens

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase == "prefill":
            sel = rw.recipe.selection
            args = (*rw.store_args(), rw.k, rw.v, rw.products.get("scores"), rw.products.get("budgets"), rw.mask)
            rw.call(self.name, kv_op("select_compact_"), (*args, sel.sinks, sel.window))
        elif "decode_append" not in rw.recipe.provided:  # else the pass providing it appends
            ev = layer_eviction(rw.recipe, rw.site)
            policy = (ev.sinks, ev.window, True, ev.by_score, ev.score_new) if ev else (0, 0, False, False, "position")
            rw.call(self.name, kv_op("append_"), (*rw.store_args(), rw.k, rw.v, *policy))
