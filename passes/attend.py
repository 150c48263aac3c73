"""`attend` (core): prefill attends over the prompt as the model does; decode attention reads the store."""

from __future__ import annotations

from kvsurgery.pass_base import Pass, SiteRewrite, kv_op
from kvsurgery.registry import register_pass

from .select import layer_eviction


@register_pass
class Attend(Pass):
    """Prefill attention stays the model's own over the prompt; decode attention is rewritten to read the store."""

    name = "attend"
    phase = "attend"
    core = True
    provides = frozenset({"attend"})

    def rewrite(self, rw: SiteRewrite) -> None:
        marker = rw.match.cache.marker
        if rw.phase == "prefill":
            for user in list(marker.users):
                user.replace_all_uses_with(rw.k if user.args[1] == 0 else rw.v)
            return
        s = rw.store
        ev = layer_eviction(rw.recipe, rw.site)
        window = rw.site.sliding_window or 0
        scale = rw.match.attention.scale
        old = rw.match.attention.output
        if ev is not None and ev.accumulate:
            args = (rw.q, s["k_store"], s["v_store"], s["pos"], s["slot_score"], s["start"], s["length"], s["seen"])
            node = rw.call(self.name, kv_op("attend_accumulate_"), (*args, scale, window), before=old)
        else:
            args = (rw.q, s["k_store"], s["v_store"], s["pos"], s["start"], s["length"], s["seen"])
            node = rw.call(self.name, kv_op("attend"), (*args, scale, window), before=old)
        old.replace_all_uses_with(node)
        rw.graph.erase_node(old)
