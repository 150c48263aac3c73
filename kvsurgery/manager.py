"""The pass manager: turns recipe text into an ordered, validated pass list, plans the store, and rewrites
every attention site of every captured graph with those passes.

It owns every composition rule: one provider per `EXCLUSIVE` capability, `identity` alone, a pass's `alone` and
`excludes` declarations, defaults for what a pass `requires`, the core select/attend passes when nothing replaces
them, and that a pass's rewrite hands on only the `products` it declares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from kvsurgery import registry
from kvsurgery.budget import Budget
from kvsurgery.errors import BudgetError, RecipeError, UnsupportedModelError
from kvsurgery.fx_utils import eliminate_dead_code, is_kv_update, op_counts
from kvsurgery.pass_base import PHASES, Eviction, Pass, PlanState, Selection, SiteRewrite
from kvsurgery.recipe import PassSpec, parse
from kvsurgery.sites import AttentionSite, find_sites, unpaired_markers
from kvsurgery.store import LayerPlan, Plane

EXCLUSIVE = ("identity", "scores", "budget", "decode_eviction", "decode_append", "quant", "select", "attend")
CORE_PASSES = ("select", "attend")


@dataclass
class SiteReport:
    layer: int
    module: str
    inserted: dict[str, list[str]]


@dataclass
class GraphReport:
    """What one rewrite did to one captured graph: op counts before/after and the nodes each pass inserted."""

    phase: str
    before: dict[str, int]
    after: dict[str, int]
    sites: list[SiteReport] = field(default_factory=list)


@dataclass
class Recipe:
    """An ordered pass list plus the budget and the selection/eviction rules its passes define."""

    passes: list[Pass]
    budget: Budget | None
    selection: Selection
    eviction: Eviction | None
    added: list[str]  # passes added as defaults, with the reason
    states: dict[str, Any] = field(default_factory=dict)  # pass name -> what its check_model returned

    @property
    def text(self) -> str:
        return "+".join(p.spec() for p in self.passes if not p.core)

    @property
    def provided(self) -> frozenset[str]:
        """Every capability some pass of the recipe provides."""
        return frozenset().union(*(p.provides for p in self.passes))

    @property
    def dynamic_budgets(self) -> bool:
        """Whether per-head budgets are decided at prefill (Ada-KV) rather than planned."""
        return any(p.dynamic_budgets for p in self.passes)

    def check_model(self, model: torch.nn.Module) -> None:
        """Run every pass's `check_model` and keep what each returns (its model state)."""
        self.states = {p.name: p.check_model(model, self) for p in self.passes}

    def state(self, p: Pass) -> Any:
        """The model state `p.check_model` returned (None before `check_model` ran)."""
        return self.states.get(p.name)

    # -- static planning ----------------------------------------------------------------------------
    def plan(self, sites: list[AttentionSite], row_lengths: list[int], max_new_tokens: int) -> list[LayerPlan]:
        """The store layout for a batch whose rows hold `row_lengths` prompt tokens (per layer, KV head, row)."""
        per_length = {n: self._plan_rows(sites, n, max_new_tokens) for n in sorted(set(row_lengths))}
        plans = []
        for i, site in enumerate(sites):
            states = [per_length[n][i] for n in row_lengths]
            rows = tuple(tuple(state.keep) for state in states)
            first = states[0]
            keep = tuple(max(column) for column in zip(*rows, strict=True))
            row_keep = rows if len(set(rows)) > 1 else None
            plans.append(
                LayerPlan(
                    layer=site.layer,
                    keep=keep,
                    room=first.room,
                    evict=first.eviction is not None,
                    head_dim=site.head_dim,
                    v_head_dim=site.v_head_dim,
                    sliding_window=site.sliding_window,
                    score_slots=first.eviction is not None and first.eviction.by_score,
                    planes=_widest_planes(states),
                    row_keep=row_keep,
                    dense_slots=max(s.dense_slots for s in states) if first.dense_slots is not None else None,
                    storage=first.storage,
                    uniform_heads=row_keep is None and len(set(keep)) == 1 and not self.dynamic_budgets,
                )
            )
        return plans

    def _plan_rows(self, sites: list[AttentionSite], prompt_len: int, max_new_tokens: int) -> list[PlanState]:
        """Each pass's static decisions for one row length, per layer."""
        budget = self.budget.resolve(prompt_len) if self.budget is not None else None
        if budget is not None and budget < self.selection.sinks + self.selection.window:
            raise BudgetError(
                f"budget {self.budget} is {budget} tokens for a {prompt_len}-token prompt, below the "
                f"{self.selection.sinks} sinks + {self.selection.window}-token window that are always kept; "
                f"raise the budget or lower the scoring pass's window (window={max(1, budget - self.selection.sinks)})"
            )
        states = []
        for site in sites:
            state = PlanState(
                site=site,
                recipe=self,
                n_layers=len(sites),
                prompt_len=prompt_len,
                max_new_tokens=max_new_tokens,
                budget=budget,
                selection=self.selection,
                eviction=self.eviction,
                keep=[budget if budget is not None else prompt_len] * site.n_kv_heads,
            )
            for p in self.passes:
                p.plan_layer(state)
            states.append(state)
        return states

    # -- graph rewriting ----------------------------------------------------------------------------
    def rewrite(self, gm: fx.GraphModule, sites: dict[int, AttentionSite]) -> GraphReport:
        """Run every pass on every attention site of a captured graph; the graph is modified in place."""
        graph = gm.graph
        before = op_counts(graph)
        matches = find_sites(graph)
        for marker in unpaired_markers(graph, matches):
            raise UnsupportedModelError(
                f"the KV cache of layer {marker.args[4]} feeds no attention kvsurgery recognises "
                "(expected scaled_dot_product_attention or matmul -> softmax -> matmul); load the model with "
                "attn_implementation='sdpa' or 'eager'"
            )
        report = GraphReport(phase="", before=dict(before), after={})
        for match in matches:
            if match.cache.kind != "kvsurgery" or match.layer not in sites:
                raise UnsupportedModelError(
                    f"attention in '{match.module}' reads a {match.cache.kind} cache, not kvsurgery's store; "
                    "pass the cache created by the rewritten model (or none) to forward/generate"
                )
            marker = match.cache.marker
            _, _, tensors, names, _, prefill, uniform_heads = marker.args
            phase = "prefill" if prefill else "decode"
            report.phase = phase
            store = dict(zip(names.split(","), tensors, strict=True))
            rw = SiteRewrite(graph, self, sites[match.layer], match, phase, store, uniform_heads)
            for p in self.passes:
                before = set(rw.products)
                p.rewrite(rw)
                undeclared = sorted(set(rw.products) - before - p.products)
                if undeclared:
                    raise RecipeError(
                        f"pass '{p.name}' handed on product {undeclared[0]!r} without declaring it; add it to "
                        f"{type(p).__name__}.products"
                    )
            report.sites.append(SiteReport(match.layer, match.module, rw.inserted))
        eliminate_dead_code(graph)  # drops the dense attention inputs the passes replaced, and the markers
        leftover = [n for n in graph.nodes if is_kv_update(n)]
        if leftover:
            raise UnsupportedModelError(
                f"internal: {len(leftover)} kvsurgery cache markers are still used after the rewrite "
                f"(layer {leftover[0].args[4]}); no pass replaced their consumers"
            )
        graph.lint()
        gm.recompile()
        report.after = dict(op_counts(graph))
        return report


def _widest_planes(states: list[PlanState]) -> tuple[Plane, ...]:
    """The planes of a layer planned once per row length: each plane with the most rows any row needs."""
    widest: dict[str, Plane] = {}
    for state in states:
        for plane in state.planes:
            known = widest.get(plane.name)
            if known is None or (plane.rows or 0) > (known.rows or 0):
                widest[plane.name] = plane
    return tuple(widest.values())


# -- building a recipe ------------------------------------------------------------------------------
def _instantiate(cls: type[Pass], options: dict) -> Pass:
    valid = cls.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise RecipeError(
            f"'{cls.name}' has no option {', '.join(repr(u) for u in unknown)}; "
            f"its options are: {', '.join(valid) or '(none)'}"
        )
    try:
        return cls(cls.Options(**options))
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"invalid options for '{cls.name}': {exc}") from exc


def _route_options(specs: list[PassSpec], options: dict) -> list[PassSpec]:
    """Attach `apply(..., window=16)`-style keyword options to the one pass in the recipe that has them."""
    routed = [PassSpec(s.name, dict(s.options)) for s in specs]
    for key, value in options.items():
        owners = [s for s in routed if key in registry.get(s.name).option_names()]
        if not owners:
            names = sorted({o for s in routed for o in registry.get(s.name).option_names()})
            raise RecipeError(
                f"no pass in this recipe takes option '{key}'; options here are: {', '.join(names) or '(none)'}"
            )
        if len(owners) > 1:
            raise RecipeError(
                f"option '{key}' matches several passes ({', '.join(s.name for s in owners)}); write it inline, "
                f"e.g. '{owners[0].name}({key}={value})'"
            )
        owners[0].options[key] = value
    return routed


def _check_exclusive(passes: list[Pass]) -> None:
    for cap in EXCLUSIVE:
        providers = [p.name for p in passes if cap in p.provides]
        if len(providers) > 1:
            raise RecipeError(
                f"'{providers[0]}' and '{providers[1]}' both provide {cap} and a recipe takes one; "
                f"use '{providers[0]}' or '{providers[1]}' (e.g. 'pyramidkv' = SnapKV scores with pyramid budgets)"
            )
    identity = [p for p in passes if "identity" in p.provides]
    if identity and len(passes) > 1:
        others = "+".join(p.name for p in passes if p is not identity[0])
        raise RecipeError(
            f"'{identity[0].name}' keeps the whole cache and cannot be combined with '{others}'; write '{others}' alone"
        )


def _check_composition(passes: list[Pass]) -> None:
    """The passes' own composition declarations: `alone` (no other pass beside it) and `excludes`."""
    for p in passes:
        others = [o for o in passes if o is not p and not o.core]
        if p.alone and others:
            raise RecipeError(
                f"'{p.name}' {p.alone}; it does not combine with '{'+'.join(o.name for o in others)}' "
                f"(write '{p.name}' alone)"
            )
        for cap, reason in p.excludes.items():
            rivals = [o.name for o in others if cap in o.provides]
            if rivals:
                raise RecipeError(f"'{p.name}' cannot be combined with {reason.format(name=p.name, rival=rivals[0])}")


def build_recipe(text: str, budget=None, **options) -> Recipe:
    """Parse, resolve defaults, validate and order a recipe."""
    specs = _route_options(parse(text), options)
    names = [s.name for s in specs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise RecipeError(f"pass '{duplicated[0]}' appears twice in recipe {text!r}")
    passes = [_instantiate(registry.get(s.name), s.options) for s in specs]
    _check_exclusive(passes)
    added = []
    while True:
        provided = set().union(*(p.provides for p in passes))
        missing = [(p, cap) for p in passes for cap in sorted(p.requires - provided)]
        if not missing:
            break
        owner, cap = missing[0]
        default = owner.defaults.get(cap)
        if default is None:
            raise RecipeError(
                f"'{owner.name}' requires {cap} but nothing in {text!r} provides it; "
                f"add a pass that does, e.g. 'snapkv+{owner.name}'"
            )
        (spec,) = parse(default)
        passes.append(_instantiate(registry.get(spec.name), spec.options))
        added.append(f"{default} (for {cap}, required by {owner.name})")
        _check_exclusive(passes)
    _check_composition(passes)
    provided = set().union(*(p.provides for p in passes))
    if "scores" in provided and "budget" not in provided:
        passes.append(_instantiate(registry.get("uniform"), {}))
        added.append("uniform (the same budget for every layer and KV head)")
    provided = set().union(*(p.provides for p in passes))
    passes += [core for name in CORE_PASSES if not (core := registry.core(name)()).provides & provided]
    order = {id(p): i for i, p in enumerate(passes)}
    passes.sort(key=lambda p: (PHASES.index(p.phase), order[id(p)]))

    needs = [p.name for p in passes if p.needs_budget]
    if needs and budget is None:
        raise BudgetError(
            f"recipe {text!r} needs a budget ({needs[0]} selects tokens): pass budget=256 (tokens kept per KV head) "
            "or budget=0.2 (fraction of the prompt)"
        )
    if budget is not None and not needs:
        raise BudgetError(f"recipe {text!r} keeps every token and takes no budget; remove budget={budget!r}")
    parsed_budget = Budget.parse(budget) if budget is not None else None

    selection = next((s for p in passes if (s := p.selection()) is not None), Selection())
    eviction = next((e for p in passes if (e := p.eviction()) is not None), None)
    if parsed_budget is not None and parsed_budget.tokens is not None:
        floor = selection.sinks + selection.window
        if parsed_budget.tokens < floor:
            raise BudgetError(
                f"budget {parsed_budget.tokens} is below the {selection.sinks} sinks + {selection.window}-token "
                f"window that are always kept; use budget >= {floor} or a smaller window"
            )
    return Recipe(passes, parsed_budget, selection, eviction, added)


def selects_tokens(text: str) -> bool:
    """Whether recipe `text` selects tokens, so it needs a budget (`snapkv`), or keeps every one (`full`, `kivi2`)."""
    try:
        build_recipe(text, budget=None)
    except BudgetError:
        return True
    return False


def check_sites(recipe: Recipe, sites: list[AttentionSite]) -> None:
    """Every pass's `check` against the model's attention sites."""
    for p in recipe.passes:
        p.check(sites, recipe)
