"""PrefixKV's store sizing: tokens a layer keeps at prefill and the decode room its anchor eviction needs."""

from __future__ import annotations

import math

ROOM_MARGIN = 2  # decode slots beyond ceil(max_new_tokens * (1 - ratio)); the fixed point never needs more than 1


def prefix_keep(prompt_len: int, ratio: float, protected: int) -> int:
    """Tokens a layer keeps at prefill: the prompt minus round(ratio * T) dropped, never below the protected ones."""
    return max(min(protected, prompt_len), prompt_len - round(ratio * prompt_len))


def decode_room(max_new_tokens: int, ratio: float) -> int:
    """Slots per KV head for decoding: the anchor rule keeps a layer within one token of (1 - ratio) * n, and the
    prefill kept at least (1 - ratio) * T - 1/2, so ceil((1 - ratio) * max_new_tokens) + 2 always suffices."""
    return math.ceil((1.0 - ratio) * max_new_tokens) + ROOM_MARGIN
