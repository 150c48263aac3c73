"""`prefixkv`: layer-wise budgets from an offline global prefix configuration (PrefixKV, Wang et al.,
arXiv 2412.03409); docs/prefixkv.md.

The budget is the retained fraction of the prompt (the paper's unit; the reference code's `--ratio` is the evicted
fraction 1 - budget). Per-layer eviction ratios for that budget come from `kvsurgery calibrate prefixkv`. At prefill
each layer keeps the sink, the last prompt token and its best tokens by accumulated attention averaged over all
heads (the same tokens for every KV head of a layer); while decoding, `prefixkv_append_` appends each token and
deletes one at a fixed anchor index whenever the layer holds more than 1 - ratio of the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsurgery.budget import Budget
from kvsurgery.calibration.artefact import load
from kvsurgery.errors import BudgetError, CalibrationError
from kvsurgery.pass_base import OLDEST_FIRST, Eviction, Pass, PlanState, Selection, SiteRewrite
from kvsurgery.reference.prefixkv_budget import decode_room, prefix_keep
from kvsurgery.registry import register_pass
from kvsurgery.sites import AttentionSite


@register_pass
class PrefixKV(Pass):
    """PrefixKV: per-layer budgets from a calibrated global prefix configuration; anchor eviction while decoding."""

    name = "prefixkv"
    phase = "score"
    provides = frozenset({"scores", "budget", "decode_eviction", "decode_append"})
    products = frozenset({"scores"})
    needs_budget = True

    @dataclass(frozen=True)
    class Options:
        calibration: str | None = None  # artefact from `kvsurgery calibrate prefixkv`
        sinks: int = 1  # first tokens always kept (the paper's evaluation: 1); must match the calibration
        distance: int = -25  # anchor = tokens kept at prefill + distance (keep // 2 when that is below 1)

        def __post_init__(self):
            if self.sinks < 1:
                raise ValueError("sinks must be >= 1 (the first token anchors each row's token count)")

    def selection(self) -> Selection:
        return Selection(sinks=self.options.sinks, window=1)  # sinks and the last prompt token

    def eviction(self) -> Eviction:
        # Marks layers as evicting while decoding; the anchor rule itself is prefixkv_append_ (inserted below).
        return Eviction(sinks=self.options.sinks, window=1)

    def check_model(self, model, recipe) -> list[float]:
        """The per-layer evicted fractions calibrated for the recipe's budget."""
        path = self.options.calibration
        if path is None:
            name = getattr(model, "name_or_path", "") or "PATH_OR_PACKAGE"
            raise CalibrationError(
                "recipe 'prefixkv' needs per-layer ratios calibrated on this model; make them with: kvsurgery "
                f"calibrate prefixkv --model {name} --out prefixkv.json  then apply(model, 'prefixkv', budget=0.2, "
                "calibration='prefixkv.json')"
            )
        artefact = load(path, "prefixkv", model)
        sinks = artefact.params.get("sinks")
        if sinks != self.options.sinks:
            raise CalibrationError(
                f"{path} was calibrated with sinks={sinks}, the recipe uses sinks={self.options.sinks}; use "
                f"prefixkv(sinks={sinks}) or recalibrate with --sinks {self.options.sinks}"
            )
        table = {float(b): [float(r) for r in rows] for b, rows in artefact.data["ratios"].items()}
        return self._ratios_for(table, recipe.budget)

    @staticmethod
    def _ratios_for(table: dict[float, list[float]], budget: Budget | None) -> list[float]:
        if budget is None or budget.fraction is None:
            raise BudgetError(
                f"prefixkv's budget is the retained fraction of the prompt (e.g. budget=0.2), got {budget}"
            )
        match = [b for b in table if abs(b - budget.fraction) < 1e-9]
        if not match:
            have = ", ".join(f"{b:g}" for b in sorted(table))
            raise CalibrationError(
                f"the prefixkv calibration has ratios for budgets {have}, not {budget.fraction:g}; use one of "
                f"those or recalibrate with: kvsurgery calibrate prefixkv ... --budgets {budget.fraction:g}"
            )
        return table[match[0]]

    def check(self, sites: list[AttentionSite], recipe) -> None:
        ratios = recipe.state(self)
        if ratios is None:
            raise CalibrationError("'prefixkv' has no ratios: apply it with kvsurgery.apply(..., calibration=...)")
        if len(ratios) != len(sites):
            raise CalibrationError(
                f"the calibration has ratios for {len(ratios)} layers, the model {len(sites)}; recalibrate"
            )

    def plan_layer(self, state: PlanState) -> None:
        site, ratio = state.site, state.recipe.state(self)[state.site.layer]
        keep = prefix_keep(state.prompt_len, ratio, self.options.sinks + 1)
        state.keep = [keep] * site.n_kv_heads
        state.room = 0 if site.sliding_window else decode_room(state.max_new_tokens, ratio)

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase == "prefill":
            scale = rw.match.attention.scale
            rw.products["scores"] = rw.op(self.name, "prefixkv_scores", q=rw.q, k=rw.k, mask=rw.mask, scale=scale)
        elif rw.site.sliding_window:  # sliding-window layers drop their oldest token, as in every recipe
            rw.op(self.name, "append_", k=rw.k, v=rw.v, **OLDEST_FIRST.append_policy())
        else:
            ratio = rw.recipe.state(self)[rw.site.layer]
            rw.op(self.name, "prefixkv_append_", k=rw.k, v=rw.v, ratio=ratio, distance=self.options.distance)
