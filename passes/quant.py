"""`QuantPass`: the base of the low-bit storage passes (kivi2/kivi4, quant1bit/quant2bit).

A quant pass provides "quant" (one per recipe) and takes over the store's "select" and "attend": whatever scoring and
budget passes decide is kept exactly as without quantization, then stored packed (`kvsurgery.reference.quant_layout`)
and read by `kvsurgery::attend_quantized`. Sliding-window layers are left to the core select/attend (full precision:
they hold at most their window). Decode-time eviction is refused: packed tokens share group statistics and are never
evicted.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsurgery import registry
from kvsurgery.errors import RecipeError, UnsupportedModelError
from kvsurgery.pass_base import Pass, PlanState, SiteRewrite
from kvsurgery.reference.quant_codes import QUANTIZABLE_DTYPES
from kvsurgery.reference.quant_layout import QuantLayout
from kvsurgery.sites import AttentionSite


class QuantPass(Pass):
    """Base class: subclasses define `layout()` (and `squeeze`, the packed logits' calibration in nats)."""

    phase = "quant"
    provides = frozenset({"quant", "select", "attend"})
    excludes: ClassVar[dict[str, str]] = {
        "decode_eviction": "decode-time eviction ('{rival}'): packed tokens share their group's statistics and are "
        "never evicted; use a prefill recipe such as 'snapkv+{name}' or 'pyramidkv+{name}'"
    }
    squeeze: float = 0.0
    uses_modality: bool = False  # CalibQuant quantizes visual tokens first when a pass provides "is_visual"

    def layout(self) -> QuantLayout:
        raise NotImplementedError

    def _core(self, name: str) -> Pass:
        """The core select/attend pass, which handles sliding-window layers and the prefill wiring."""
        cores = self.__dict__.setdefault("_cores", {})
        if name not in cores:
            cores[name] = registry.core(name)()
        return cores[name]

    # -- validation ---------------------------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module, recipe) -> None:
        dtype = getattr(model, "dtype", None)
        if dtype not in QUANTIZABLE_DTYPES:
            raise UnsupportedModelError(
                f"'{self.name}' quantizes float32, float16 or bfloat16 KV caches, and this model runs in {dtype}; "
                "convert it (e.g. model.to(torch.bfloat16)) or use a recipe without quantization"
            )

    def check(self, sites: list[AttentionSite], recipe) -> None:
        quantized = [s for s in sites if not s.sliding_window]
        if not quantized:
            raise UnsupportedModelError(
                f"every attention layer of this model uses a sliding window, which '{self.name}' leaves in full "
                "precision: it would quantize nothing"
            )
        lay = self.layout()
        for site in quantized:
            try:
                lay.k.check_dim(site.head_dim, "key")
                lay.v.check_dim(site.v_head_dim, "value")
            except ValueError as exc:
                raise RecipeError(f"'{self.name}' cannot quantize {site.module}: {exc}") from exc

    # -- planning and rewriting -----------------------------------------------------------------------------
    def plan_layer(self, state: PlanState) -> None:
        self._core("select").plan_layer(state)
        site = state.site
        if site.sliding_window:
            return
        lay = self.layout()
        shared = state.recipe.dynamic_budgets
        packed, dense = lay.allocation(state.keep, state.room, shared)
        state.dense_slots = dense
        state.planes += lay.planes(site.n_kv_heads, packed, site.head_dim, site.v_head_dim)
        squeeze = f", packed logits squeezed by {self.squeeze:g} nats" if self.squeeze > 0 else ""
        state.storage = f"{self.name}: {lay.describe()}{squeeze}"

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.site.sliding_window:
            self._core("select").rewrite(rw)
            self._core("attend").rewrite(rw)
            return
        layout = self.layout().text()
        if rw.phase == "prefill":
            sel = rw.recipe.selection
            first = rw.products.get("is_visual") if self.uses_modality else None
            scores, budgets = rw.products.get("scores"), rw.products.get("budgets")
            rw.op(
                self.name,
                "select_quantized_",
                k=rw.k,
                v=rw.v,
                scores=scores,
                budgets=budgets,
                mask=rw.mask,
                quantize_first=first,
                sinks=sel.sinks,
                window=sel.window,
                layout=layout,
            )
            self._core("attend").rewrite(rw)  # prefill attention stays the model's own, over the whole prompt
            return
        rw.op(self.name, "append_quantized_", k=rw.k, v=rw.v, layout=layout)
        attention = rw.match.attention
        node = rw.op(
            self.name,
            "attend_quantized",
            before=attention.output,
            q=rw.q,
            scale=attention.scale,
            layout=layout,
            squeeze=self.squeeze,
        )
        attention.output.replace_all_uses_with(node)
        rw.graph.erase_node(attention.output)
