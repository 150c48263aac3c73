"""`doublesparse`: Double Sparsity (Yang et al., 2024, arXiv 2408.07092); docs/doublesparse.md.

The store keeps every token (no eviction) plus a label plane. `budget` is k, the tokens each KV head attends to per
decode step (an int, or a fraction of the prompt). The first `dense_layers` layers, and sliding-window layers, attend
densely. Prefill attention is the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsurgery.calibration.doublesparse import load_channels
from kvsurgery.errors import CalibrationError, RecipeError
from kvsurgery.pass_base import Pass, PlanState, SiteRewrite
from kvsurgery.reference import doublesparse as sparse_attention
from kvsurgery.registry import register_pass
from kvsurgery.sites import AttentionSite
from kvsurgery.store import Plane

HOW_TO_CALIBRATE = (
    "make one with `kvsurgery calibrate doublesparse --model ... --out channels.json` "
    "(or kvsurgery.calibration.doublesparse.calibrate_model) and pass calibration='channels.json'"
)


@register_pass
class DoubleSparsity(Pass):
    """Double Sparsity: keeps every token; each decode step attends to the top-k tokens by outlier-channel labels."""

    name = "doublesparse"
    phase = "attend"
    provides = frozenset({"attend"})
    alone = "keeps every token and replaces decode attention"
    needs_budget = True

    @dataclass(frozen=True)
    class Options:
        calibration: str = ""  # artefact of `kvsurgery calibrate doublesparse` for this model
        group_factor: int = 4  # r = head_dim // group_factor outlier channels per query head
        r: int = 0  # outlier channels per query head; 0 = head_dim // group_factor
        label_bits: int = 4  # label precision: 16 (bfloat16) or 8/4/2-bit per-label min-max codes
        dense_layers: int = 2  # the first layers attend densely (the paper's "first 2 layers")

        def __post_init__(self):
            if self.group_factor < 1 or self.r < 0 or self.dense_layers < 0:
                raise ValueError("group_factor >= 1, r >= 0 and dense_layers >= 0 are required")
            if self.label_bits not in sparse_attention.LABEL_BITS:
                raise ValueError(f"label_bits must be one of {sparse_attention.LABEL_BITS}, got {self.label_bits}")

    def channels_per_head(self, head_dim: int) -> int:
        return self.options.r or head_dim // self.options.group_factor

    # -- validation ---------------------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module, recipe) -> list[torch.Tensor]:
        """The calibrated outlier channels, per layer [Hq, head_dim] (ranked)."""
        if not self.options.calibration:
            raise CalibrationError(f"doublesparse needs this model's channel calibration: {HOW_TO_CALIBRATE}")
        return load_channels(self.options.calibration, model)

    def check(self, sites: list[AttentionSite], recipe) -> None:
        channels = recipe.state(self)
        o = self.options
        for site in sites:
            r = self.channels_per_head(site.head_dim)
            if not 1 <= r <= site.head_dim or (r * o.label_bits) % 8:
                raise RecipeError(
                    f"doublesparse: r = {r} channels of head_dim {site.head_dim} at {o.label_bits}-bit labels is "
                    "not storable; need 1 <= r <= head_dim and r * label_bits a multiple of 8 (set r or group_factor)"
                )
            layer_channels = channels[site.layer] if site.layer < len(channels) else None
            if layer_channels is None or tuple(layer_channels.shape) != (site.n_heads, site.head_dim):
                raise CalibrationError(
                    f"the doublesparse calibration does not describe layer {site.layer} "
                    f"({site.n_heads} query heads x head_dim {site.head_dim}); {HOW_TO_CALIBRATE}"
                )

    def sparse(self, site: AttentionSite) -> bool:
        return site.layer >= self.options.dense_layers and not site.sliding_window

    # -- store plan ---------------------------------------------------------------------------------
    def plan_layer(self, state: PlanState) -> None:
        site = state.site
        if site.sliding_window:
            state.keep = [site.sliding_window] * site.n_kv_heads  # the whole window; it evicts its oldest
            return
        state.keep = [state.prompt_len] * site.n_kv_heads  # every token; `budget` is k, not what is kept
        if self.sparse(site):
            group = site.n_heads // site.n_kv_heads
            bits = self.options.label_bits
            r = self.channels_per_head(site.head_dim)
            dtype = torch.bfloat16 if bits == 16 else torch.uint8
            state.planes.append(Plane("labels", (group, sparse_attention.label_width(r, bits)), dtype))
            if bits < 16:
                state.planes.append(Plane("label_range", (group, 2), torch.float16))

    # -- graph rewrite ------------------------------------------------------------------------------
    def rewrite(self, rw: SiteRewrite) -> None:
        scale = rw.match.attention.scale
        if rw.phase == "prefill":
            if self.sparse(rw.site):
                rw.op(self.name, "label_fill_", channels=self._channels(rw), bits=self.options.label_bits)
            marker = rw.match.cache.marker
            for user in list(marker.users):  # prefill attention stays the model's own, over the prompt
                user.replace_all_uses_with(rw.k if user.args[1] == 0 else rw.v)
            return
        old = rw.match.attention.output
        if self.sparse(rw.site):
            bits = self.options.label_bits
            channels = self._channels(rw)
            rw.op(self.name, "label_append_", before=old, k=rw.k, channels=channels, bits=bits)
            budget = rw.recipe.budget
            node = rw.op(
                self.name,
                "sparse_attend",
                before=old,
                q=rw.q,
                channels=channels,
                scale=scale,
                tokens=budget.tokens or 0,
                fraction=budget.fraction or 0.0,
                bits=bits,
            )
        else:
            window = rw.site.sliding_window or 0
            node = rw.op(self.name, "attend", before=old, q=rw.q, scale=scale, window=window)
        old.replace_all_uses_with(node)
        rw.graph.erase_node(old)

    def _channels(self, rw: SiteRewrite) -> list[int]:
        """The layer's outlier channels [Hq, r], flattened (ops take them as a constant int list)."""
        site = rw.site
        return rw.recipe.state(self)[site.layer][:, : self.channels_per_head(site.head_dim)].flatten().tolist()
