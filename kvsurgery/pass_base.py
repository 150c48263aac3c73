"""The `Pass` base class, the vocabularies passes declare against, and the contexts they plan and rewrite through.

A pass declares what it `provides` and `requires` (capabilities, `CAPABILITIES`), the `products` it hands later
passes at a site (`PRODUCTS`), its `Options` dataclass, and implements any of:
  check_model(model, recipe)  read what the pass needs from the model (config token ids, calibration) or refuse it;
                              what it returns is the pass's model state, handed back as `recipe.state(self)`
  check(sites, recipe)        validate options against the model's attention sites and the budget
  plan_layer(state)           shape the static store plan (budgets, eviction policy) of one layer
  rewrite(rw)                 insert nodes into one site of one captured graph (rw.phase: prefill or decode)
The manager (`kvsurgery.manager`) owns composition: it orders passes by phase (score < budget < select < quant <
attend), then recipe order, and refuses combinations the declarations rule out. `state.recipe` and `rw.recipe` are the
recipe being applied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx

from kvsurgery.fx_utils import UNIFORM_HEADS, op_name
from kvsurgery.ops import OPS
from kvsurgery.sites import AttentionSite, SiteMatch
from kvsurgery.store import STORE_TENSORS, Plane

if TYPE_CHECKING:
    from kvsurgery.manager import Recipe

PHASES = ("score", "budget", "select", "quant", "attend")

# Capabilities a pass can provide or require (`kvsurgery.manager.EXCLUSIVE`: those a recipe takes one provider of).
CAPABILITIES = {
    "identity": "keeps every token (no compression)",
    "scores": "token importance scores at prefill",
    "budget": "how many tokens each layer / KV head keeps",
    "select": "compaction of kept tokens into the store",
    "decode_eviction": "evicts a token per step when a segment is full",
    "decode_append": "writes each decoded token into the store itself (the core select pass then inserts no append_)",
    "quant": "low-bit storage of the kept tokens",
    "attend": "decode attention over the store",
}

# What a pass's rewrite can hand the passes after it at one site (`rw.products[name]`, an fx node).
PRODUCTS = {
    "scores": "token scores [B, Hkv, T] at prefill (the select pass keeps the top ones)",
    "budgets": "per-KV-head budgets [B, Hkv] decided at prefill (Ada-KV)",
    "is_visual": "which prompt tokens are image tokens, bool [B, T]",
}


@dataclass(frozen=True)
class Selection:
    """Tokens always kept at prefill, set by the scoring pass: the first `sinks` and the last `window`."""

    sinks: int = 0
    window: int = 0


@dataclass(frozen=True)
class Eviction:
    """Decode-time eviction: when a segment is full, one unprotected token leaves per step.

    Protected when a new token arrives: the `sinks` earliest and the `window` most recent cached tokens (so
    `window` + 1 recent tokens remain after the step). The victim is the lowest slot score
    (`by_score`) or the oldest. New tokens start at score `score_new` ("position" or "zero"); `accumulate`
    adds each step's attention to the slot scores (H2O).
    """

    sinks: int = 0
    window: int = 0
    by_score: bool = False
    score_new: str = "position"
    accumulate: bool = False

    def append_policy(self) -> dict[str, Any]:
        """This policy as the decode append op's (`append_`) arguments."""
        return {
            "sinks": self.sinks,
            "window": self.window,
            "evict": True,
            "by_score": self.by_score,
            "score_new": self.score_new,
        }


OLDEST_FIRST = Eviction()
NO_EVICTION = {**OLDEST_FIRST.append_policy(), "evict": False}  # `append_`'s arguments when nothing is evicted


@dataclass
class PlanState:
    """Per-layer static decisions, refined by each pass's `plan_layer` before the store is allocated."""

    site: AttentionSite
    recipe: Recipe
    n_layers: int
    prompt_len: int
    max_new_tokens: int
    budget: int | None  # tokens per KV head (resolved from the recipe's budget), None = keep everything
    selection: Selection
    eviction: Eviction | None
    keep: list[int] = field(default_factory=list)
    room: int = 0
    planes: list[Plane] = field(default_factory=list)  # extra per-slot store tensors (see store.Plane)
    dense_slots: int | None = None  # full-precision k/v/pos slots when a quant pass packs the rest (None: all)
    storage: str = ""  # how a quant pass stores the kept tokens (shown by explain)


@dataclass
class SiteRewrite:
    """Handles on one attention site of one captured graph, and the nodes passes insert there."""

    graph: fx.Graph
    recipe: Recipe
    site: AttentionSite
    match: SiteMatch
    phase: str  # "prefill" or "decode"
    store: dict[str, fx.Node]
    uniform_heads: bool  # the layer's KV heads own equal segments (`LayerPlan.uniform_heads`, from the marker)
    products: dict[str, Any] = field(default_factory=dict)
    inserted: dict[str, list[str]] = field(default_factory=dict)

    @property
    def q(self) -> fx.Node:
        return self.match.attention.q

    @property
    def k(self) -> fx.Node:
        return self.match.cache.k_new

    @property
    def v(self) -> fx.Node:
        return self.match.cache.v_new

    @property
    def mask(self) -> fx.Node | None:
        return self.match.attention.mask

    def call(self, pass_name: str, op, args: tuple, before: fx.Node | None = None) -> fx.Node:
        """Insert `op(*args)` (before the cache update by default) and record it under `pass_name`."""
        anchor = before if before is not None else self.match.cache.marker
        with self.graph.inserting_before(anchor):
            node = self.graph.call_function(op, args)
        node.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack", {}))
        node.meta[UNIFORM_HEADS] = self.uniform_heads
        self.inserted.setdefault(pass_name, []).append(op_name(node))
        return node

    def op(self, pass_name: str, op: str, before: fx.Node | None = None, **args: Any) -> fx.Node:
        """Insert `torch.ops.kvsurgery.<op>`: its store tensors (bare parameters of its OpDef) from this site's
        store, every other parameter from `args` by name, in the schema's order (see `call`)."""
        definition = OPS[op]
        stored = definition.store_names
        values = []
        for param, name in zip(definition.params, definition.names, strict=True):
            if name in stored:  # an optional store tensor the layer does not hold is None
                values.append(self.store.get(name) if STORE_TENSORS[name].endswith("?") else self.store[name])
            elif name in args:
                values.append(args.pop(name))
            else:
                raise TypeError(f"{pass_name}: op {op!r} needs {param!r}, which the pass did not give")
        if args:
            raise TypeError(f"{pass_name}: op {op!r} has no parameter {sorted(args)} (it takes {definition.params})")
        return self.call(pass_name, kv_op(op), tuple(values), before=before)


class Pass:
    """Base class of graph passes. Subclasses live one per file in `passes/` and register by `name`."""

    name: ClassVar[str]
    phase: ClassVar[str]
    provides: ClassVar[frozenset[str]] = frozenset()  # capabilities (CAPABILITIES)
    requires: ClassVar[frozenset[str]] = frozenset()
    products: ClassVar[frozenset[str]] = frozenset()  # what rewrite() puts in rw.products (PRODUCTS)
    excludes: ClassVar[dict[str, str]] = {}  # capability -> why no other pass of the recipe may provide it
    alone: ClassVar[str] = ""  # why the pass takes no other (non-core) pass beside it; "" = it composes
    defaults: ClassVar[dict[str, str]] = {}  # capability -> recipe used when no pass in the recipe provides it
    needs_budget: ClassVar[bool] = False
    dynamic_budgets: ClassVar[bool] = False  # per-head budgets decided at prefill ("budgets" product), not planned
    core: ClassVar[bool] = False  # added by the manager, not named in recipes

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Options)]

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    def spec(self) -> str:
        """Canonical recipe text for this pass with its non-default options."""
        default = self.Options()
        changed = [
            f"{f.name}={getattr(self.options, f.name)}"
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != getattr(default, f.name)
        ]
        return f"{self.name}({','.join(changed)})" if changed else self.name

    def selection(self) -> Selection | None:
        """The always-kept tokens this (scoring) pass defines, if any."""
        return None

    def eviction(self) -> Eviction | None:
        """The decode-time eviction this pass defines, if any."""
        return None

    def check_model(self, model: torch.nn.Module, recipe: Recipe) -> Any:
        """Validate against the model itself and read what the pass needs from it (its config's token ids, a
        calibration artefact bound to it); runs before discovery, so refusals are quick. The return value is this
        pass's model state: the manager keeps it and hands it back as `recipe.state(self)`."""
        return None

    def check(self, sites: list[AttentionSite], recipe: Recipe) -> None:
        """Validate options against the model's attention sites and the recipe's budget; raise a clear error."""

    def plan_layer(self, state: PlanState) -> None:
        """Refine the static plan of one layer."""

    def rewrite(self, rw: SiteRewrite) -> None:
        """Insert this pass's nodes at one site."""


def kv_op(name: str):
    """`torch.ops.kvsurgery.<name>.default`."""
    return getattr(torch.ops.kvsurgery, name).default
