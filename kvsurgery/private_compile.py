"""torch.compile of a private copy of a function, with a `release` that forgets everything Dynamo keeps for it.

Dynamo keeps, and never frees on its own: compiled entries and guards on the code object, the backend in a
process-wide table, recorded guard failures and dynamic-shape state per code object, memos keyed by code object,
and per guarded object a `weakref.finalize` holding the guards (alive as long as the longest-lived object they
check). `release` drops exactly this copy's share, so a rewritten model and all that was compiled for it can be
freed without `torch._dynamo.reset()`, which would also discard the user's own compiled code.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code
from torch._dynamo import bytecode_transformation, guards, pgo
from torch._dynamo.eval_frame import cached_backends
from torch._dynamo.utils import guard_failures

from kvsurgery.fx_utils import own_code_copy

# functools caches of pure functions of a code object (its local names, its cleaned bytecode); they hold every
# code object Dynamo ever compiled and can only be cleared whole, which costs later compiles a recomputation
_CODE_MEMOS = (
    getattr(guards, "code_framelocals_names_reversed_cached", None),
    getattr(bytecode_transformation, "_cached_cleaned_instructions", None),
)


class PrivateCompile:
    """`torch.compile(backend=backend, **options)` of a private copy of `fn`; use as a context manager or call
    `release()` when done (releasing twice is harmless; calling again afterwards compiles anew)."""

    def __init__(self, fn: Callable, name: str, backend: Callable, **options):
        self.step = own_code_copy(fn, name)
        self._backend = backend
        self.compiled = torch.compile(self.step, backend=backend, **options)

    def __call__(self, *args, **kwargs):
        return self.compiled(*args, **kwargs)

    def __enter__(self) -> PrivateCompile:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def cache_entries(self) -> int:
        """How many compiled entries Dynamo holds for the copy now."""
        return len(_debug_get_cache_entry_list(self.step.__code__))

    def release(self) -> None:
        """Drop the copy's compiled entries and guards (their cleanup hooks remove the compiled graphs from the
        copy's globals) with their finalizers, its recorded guard failures and dynamic-shape state, the backend
        Dynamo registered and the memos keyed by code object; other code's compiled entries are untouched."""
        code = self.step.__code__
        managers = {id(entry.guard_manager) for entry in _debug_get_cache_entry_list(code)}
        reset_code(code)
        _detach_invalidators(managers)
        guard_failures.pop(code, None)
        shape_state = getattr(pgo, "_CODE_STATE", None) or {}
        for key in [k for k in shape_state if (k.name, k.firstlineno) == (code.co_name, code.co_firstlineno)]:
            del shape_state[key]
        for key, wrapper in list(cached_backends.items()):
            if getattr(wrapper, "compiler_fn", wrapper) is self._backend:
                del cached_backends[key]
        for memo in _CODE_MEMOS:
            if memo is not None:
                memo.cache_clear()


def _detach_invalidators(managers: set[int]) -> None:
    """Detach the finalizers Dynamo registered to invalidate the guards with these ids (`CheckFunctionManager.
    invalidate` bound to the guards' owner): the entries are gone, and the finalizers would keep their guards."""
    if not managers:
        return
    for finalizer, info in list(weakref.finalize._registry.items()):
        owner = getattr(getattr(info.func, "func", None), "__self__", None)
        if id(getattr(owner, "guard_manager", None)) in managers:
            finalizer.detach()
