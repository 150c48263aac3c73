"""`select` (core): writes the kept tokens into the store at prefill, appends them at decode."""

from __future__ import annotations

from kvsurgery.pass_base import NO_EVICTION, OLDEST_FIRST, Eviction, Pass, PlanState, SiteRewrite
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
            rw.op(
                self.name,
                "select_compact_",
                k=rw.k,
                v=rw.v,
                scores=rw.products.get("scores"),
                budgets=rw.products.get("budgets"),
                mask=rw.mask,
                sinks=sel.sinks,
                window=sel.window,
            )
        elif "decode_append" not in rw.recipe.provided:  # else the pass providing it appends
            ev = layer_eviction(rw.recipe, rw.site)
            policy = ev.append_policy() if ev else NO_EVICTION
            rw.op(self.name, "append_", k=rw.k, v=rw.v, **policy)
