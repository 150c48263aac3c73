"""`headkv` / `headkv-r2`: per-head budgets from head-importance scores (HeadKV, Fu et al., ICLR 2025,
arXiv 2410.19258); docs/headkv.md.

The scores come from `kvsurgery calibrate headkv` (retrieval heads, recipe `headkv`) or `... --criterion
reasoning` (retrieval-reasoning heads, recipe `headkv-r2`). Tokens are chosen per KV head by SnapKV scores
(window 8, max-pool 7), as the authors ran it.

Deviation (GQA): the authors' cache holds one copy of the KV per query head; kvsurgery stores per KV head, so
the normalised query-head scores are summed over each KV head's query group and the budget formula runs over
L x H_kv heads (the average stays `budget` per KV head, the memory of a uniform SnapKV cache of that budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsurgery.calibration.artefact import load
from kvsurgery.errors import CalibrationError
from kvsurgery.pass_base import Pass, PlanState
from kvsurgery.reference.headkv import head_caps, kv_head_importance, redistribute_overflow
from kvsurgery.registry import register_pass
from kvsurgery.sites import AttentionSite


class _HeadKVBase(Pass):
    phase = "budget"
    provides = frozenset({"budget"})
    requires = frozenset({"scores"})
    defaults: ClassVar[dict[str, str]] = {"scores": "snapkv(window=8,kernel=7,pool=max)"}
    needs_budget = True
    criterion: ClassVar[str]

    @dataclass(frozen=True)
    class Options:
        calibration: str | None = None  # artefact from `kvsurgery calibrate headkv`
        beta: float = 1.01  # pool share: floor(b / beta) per head is pooled; larger = more uniform
        temp: float = 1.0  # scores are raised to this power before sharing
        redistribute: bool = False  # give the budget of caps above the prompt to other heads (not in the paper)

        def __post_init__(self):
            if not self.beta >= 1.0:
                raise ValueError("beta must be >= 1 (1 pools the whole budget, larger keeps more per head)")
            if not self.temp > 0:
                raise ValueError("temp must be > 0")

    def _how_to_calibrate(self, model) -> str:
        name = getattr(model, "name_or_path", "") or "PATH_OR_PACKAGE"
        flag = "" if self.criterion == "retrieval" else " --criterion reasoning"
        out = f"{self.name}.json"
        return (
            f"make one with: kvsurgery calibrate headkv --model {name} --out {out}{flag}  "
            f"then apply(model, '{self.name}', budget=..., calibration='{out}')"
        )

    def check_model(self, model: torch.nn.Module, recipe) -> torch.Tensor:
        """[L, H_kv] normalised KV-head importance from the calibration artefact."""
        path = self.options.calibration
        if path is None:
            raise CalibrationError(
                f"recipe '{self.name}' needs head-importance scores calibrated on this model; "
                + self._how_to_calibrate(model)
            )
        artefact = load(path, "headkv", model)
        criterion = artefact.data.get("criterion")
        if criterion != self.criterion:
            other = "headkv-r2" if criterion == "reasoning" else "headkv"
            raise CalibrationError(
                f"{path} holds {criterion} head scores, but '{self.name}' uses {self.criterion} scores; use recipe "
                f"'{other}' with it, or {self._how_to_calibrate(model)}"
            )
        scores = torch.tensor(artefact.data["scores"], dtype=torch.float64)  # [L, H] per query head
        return kv_head_importance(scores, artefact.model.n_kv_heads, self.options.temp)

    def check(self, sites: list[AttentionSite], recipe) -> None:
        shares = recipe.state(self)
        if shares is None:
            raise CalibrationError(f"'{self.name}' has no scores: apply it with kvsurgery.apply(..., calibration=...)")
        n_layers, n_kv = shares.shape
        if n_layers != len(sites) or any(s.model_kv_heads != n_kv for s in sites):
            raise CalibrationError(
                f"the calibration has {n_layers} layers x {n_kv} KV heads, the model's attention sites "
                f"{len(sites)} x {sites[0].model_kv_heads}; recalibrate on this model"
            )

    def plan_layer(self, state: PlanState) -> None:
        """Static per-KV-head budgets: the formula's cap plus the always-kept sinks and window.

        Faithful to the reference code: when the prompt has fewer selectable tokens than `base`, every head keeps
        everything; a cap above what a head can select is truncated (the total then falls short of the budget),
        unless `redistribute` hands that excess to the other heads.
        """
        site = state.site
        always = state.selection.sinks + state.selection.window
        base = state.budget - always  # >= 0: the manager refuses budgets below sinks + window
        selectable = state.prompt_len - always
        if base > selectable:
            state.keep = [state.prompt_len] * site.n_kv_heads
            return
        shares = state.recipe.state(self)
        caps = head_caps(shares, base, self.options.beta)
        if self.options.redistribute:
            caps = redistribute_overflow(caps, selectable, shares)
        heads = site.kv_heads  # the caps are the whole model's; under tensor parallelism this process's share
        state.keep = [min(cap, selectable) + always for cap in caps[site.layer][heads.start : heads.stop]]


@register_pass
class HeadKV(_HeadKVBase):
    """HeadKV-R: per-KV-head budgets from retrieval-head scores (calibrate first: kvsurgery calibrate headkv)."""

    name = "headkv"
    criterion = "retrieval"


@register_pass
class HeadKVR2(_HeadKVBase):
    """HeadKV-R2: per-KV-head budgets from retrieval-reasoning head scores (calibrate with --criterion reasoning)."""

    name = "headkv-r2"
    criterion = "reasoning"
