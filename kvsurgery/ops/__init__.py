"""kvsurgery custom ops (`torch.ops.kvsurgery.*`)."""

from kvsurgery.ops import core  # noqa: F401
