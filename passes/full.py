"""`full`: the identity recipe."""

from __future__ import annotations

from kvsurgery.pass_base import Pass
from kvsurgery.registry import register_pass


@register_pass
class Full(Pass):
    """Identity: keeps every token (the store is exact); a baseline and a check of the machinery."""

    name = "full"
    phase = "select"
    provides = frozenset({"identity"})
