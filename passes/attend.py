"""`attend` (core): prefill attends over the prompt as the model does; decode attention reads the store."""

from __future__ import annotations

from kvsurgery.pass_base import Pass, SiteRewrite
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
        ev = layer_eviction(rw.recipe, rw.site)
        window = rw.site.sliding_window or 0
        scale = rw.match.attention.scale
        old = rw.match.attention.output
        if ev is not None and ev.accumulate:
            node = rw.op(self.name, "attend_accumulate_", before=old, q=rw.q, scale=scale, window=window)
        else:
            node = rw.op(self.name, "attend", before=old, q=rw.q, scale=scale, window=window)
        old.replace_all_uses_with(node)
        rw.graph.erase_node(old)
