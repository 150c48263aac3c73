"""The transformers differences kvsurgery depends on, in one place.

transformers 5.24 renamed the cache keyword of every `forward`/`generate` (and the output field) from
`past_key_values` to `cache`; the old name is a deprecated alias there. kvsurgery accepts either name from the
user on every supported version and hands the cache to the model under the name the model's own `forward`
declares, so the cache a model writes to is always the one kvsurgery allocated.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from kvsurgery.errors import KVSurgeryError

CACHE_KEYWORDS = ("cache", "past_key_values")  # the current name first, then the pre-5.24 one


def cache_keyword(forward: Callable | torch.nn.Module) -> str:
    """The keyword under which `forward` (a model or its forward method) takes its KV cache."""
    fn = forward.forward if isinstance(forward, torch.nn.Module) else forward
    parameters = inspect.signature(fn).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise KVSurgeryError(
        f"{getattr(fn, '__qualname__', fn)!r} takes no KV cache (no parameter named "
        f"{' or '.join(CACHE_KEYWORDS)}); kvsurgery compresses the cache of transformers causal LMs"
    )


def pop_cache(call: dict[str, Any]) -> Any:
    """Remove and return the cache passed under either keyword (None if neither); both at once is an error."""
    given = [cache for name in CACHE_KEYWORDS if (cache := call.pop(name, None)) is not None]
    if len(given) > 1:
        raise KVSurgeryError(
            "got a cache both as cache= and as past_key_values= (the same argument under its new and old name); "
            "pass it once, as cache="
        )
    return given[0] if given else None


def output_cache(output: Mapping[str, Any]) -> Any:
    """The cache a model output carries (`output.cache` from 5.24 on, `output.past_key_values` before)."""
    for name in CACHE_KEYWORDS:
        if output.get(name) is not None:
            return output[name]
    return None
