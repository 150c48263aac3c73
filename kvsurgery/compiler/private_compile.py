"""torch.compile of a private copy of a function, with a `release` that forgets everything torch keeps for it.

Dynamo keeps, and never frees on its own: compiled entries and guards on the code object, the backend in a
process-wide table, recorded guard failures and dynamic-shape state per code object, memos keyed by code object,
and per guarded object a `weakref.finalize` holding the guards (alive as long as the longest-lived object they
check). Around each compile torch also keeps, process-wide: the source of every GraphModule FX generates
(`_loader.eval_cache`, `linecache`), every module Inductor loads (`PyCodeCache`, `sys.modules`), ShapeEnv method
memos keyed by the ShapeEnv (`get_implications` is unbounded), and a traceback of every metric a compile set.
A trace whose input is a view is never collected at all while its ShapeEnv tracks that input's fake (the fake
view holds its base from C++, where the garbage collector cannot see). `release` drops exactly this copy's
share, so a rewritten model and all that was compiled for it can be freed without `torch._dynamo.reset()`, which
would also discard the user's own compiled code.
"""

from __future__ import annotations

import linecache
import sys
import weakref
from collections.abc import Callable
from types import ModuleType

import torch
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code
from torch._dynamo import bytecode_transformation, guards, pgo
from torch._dynamo.eval_frame import cached_backends
from torch._dynamo.utils import get_metrics_context, guard_failures
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.graph_module import _loader

from kvsurgery.fx_utils import own_code_copy

# functools caches of pure functions of a code object (its local names, its cleaned bytecode); they hold every
# code object Dynamo ever compiled and can only be cleared whole, which costs later compiles a recomputation
_CODE_MEMOS = (
    getattr(guards, "code_framelocals_names_reversed_cached", None),
    getattr(bytecode_transformation, "_cached_cleaned_instructions", None),
)
# ShapeEnv's method memos (functools caches, some behind a version-checking wrapper that exposes `cache_clear`):
# keyed by the ShapeEnv, so they keep every traced graph's shape environment and its fake-tensor dispatch cache
# alive; memos of the ShapeEnv's state, so clearing them costs only a recomputation
_SHAPE_ENV_MEMOS = tuple(m for m in vars(ShapeEnv).values() if callable(getattr(m, "cache_clear", None)))
_FX_KEY_PREFIX = "<eval_with_key>."
_INDUCTOR_CODE_CACHE = "torch._inductor.codecache"


class PrivateCompile:
    """`torch.compile(backend=backend, **options)` of a private copy of `fn`; use as a context manager or call
    `release()` when done (releasing twice is harmless; calling again afterwards compiles anew)."""

    def __init__(self, fn: Callable, name: str, backend: Callable, **options):
        self.step = own_code_copy(fn, name)
        self._shape_envs: list[weakref.ref[ShapeEnv]] = []  # of its traces
        self._backend = _noting_shape_envs(backend, self._shape_envs)
        self.compiled = torch.compile(self.step, backend=self._backend, **options)
        self._fx_sources: list[range] = []  # ids of the GraphModule sources FX cached while this copy compiled
        self._inductor_modules: list[ModuleType] = []  # the modules Inductor loaded for it

    def __call__(self, *args, **kwargs):
        fx_first, inductor_first = _loader.next_id, len(_inductor_modules())
        out = self.compiled(*args, **kwargs)
        if _loader.next_id != fx_first:  # it compiled (every compile builds a GraphModule): note what it left
            self._fx_sources.append(range(fx_first, _loader.next_id))
            self._inductor_modules += _inductor_modules()[inductor_first:]
        return out

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
        Dynamo registered, the memos keyed by code object or ShapeEnv, the GraphModule sources and Inductor
        modules loaded while it compiled, the fakes its traces tracked and the metric tracebacks of finished
        compiles; other code's compiled entries are untouched."""
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
        for memo in (*_CODE_MEMOS, *_SHAPE_ENV_MEMOS):
            if memo is not None:
                memo.cache_clear()
        _forget_fx_sources(self._fx_sources)
        _forget_inductor_modules(self._inductor_modules)
        _drop_tracked_fakes(self._shape_envs)
        self._fx_sources, self._inductor_modules = [], []
        self._shape_envs.clear()
        _clear_metric_tracebacks()


def _noting_shape_envs(backend: Callable, shape_envs: list[weakref.ref[ShapeEnv]]) -> Callable:
    """`backend`, noting in `shape_envs` the ShapeEnv of each graph it compiles (their tracked fakes are dropped on
    release). It holds the list, not the PrivateCompile: Dynamo keeps backends where the collector cannot look."""

    def compile_graph(gm, example_inputs):
        context = torch._guards.TracingContext.try_get()
        shape_env = context.fake_mode.shape_env if context is not None and context.fake_mode else None
        if shape_env is not None:
            shape_envs.append(weakref.ref(shape_env))
        return backend(gm, example_inputs)

    return compile_graph


def _detach_invalidators(managers: set[int]) -> None:
    """Detach the finalizers Dynamo registered to invalidate the guards with these ids (`CheckFunctionManager.
    invalidate` bound to the guards' owner): the entries are gone, and the finalizers would keep their guards."""
    if not managers:
        return
    for finalizer, info in list(weakref.finalize._registry.items()):
        owner = getattr(getattr(info.func, "func", None), "__self__", None)
        if id(getattr(owner, "guard_manager", None)) in managers:
            finalizer.detach()


def _forget_fx_sources(ids: list[range]) -> None:
    """Drop the GraphModule sources FX cached under these ids (`<eval_with_key>.N`, possibly with a suffix) from its
    loader and from `linecache`: they only serve tracebacks and `inspect` of graphs that are gone."""
    if not ids:
        return
    for key in list(_loader.eval_cache):
        number = key.removeprefix(_FX_KEY_PREFIX).split(" ", 1)[0]
        if number.isdigit() and any(int(number) in r for r in ids):
            del _loader.eval_cache[key]
            linecache.cache.pop(key, None)


def _clear_metric_tracebacks() -> None:
    """Clear the tracebacks Dynamo's metrics context keeps of every metric set (to explain one set twice within a
    compile) once no compile is in progress; torch versions without them have nothing to clear."""
    metrics = get_metrics_context()
    edits = getattr(metrics, "_edits", None)
    if isinstance(edits, list) and not metrics.in_progress():
        edits.clear()


def _inductor_modules() -> list[ModuleType]:
    """Every module Inductor has loaded in this process (in load order); none before Inductor is imported."""
    codecache = sys.modules.get(_INDUCTOR_CODE_CACHE)
    return getattr(codecache.PyCodeCache, "modules", []) if codecache is not None else []


def _forget_inductor_modules(modules: list[ModuleType]) -> None:
    """Unload these Inductor modules from its code cache and `sys.modules` (their files stay on disk, so a later
    compile of the same code loads them again)."""
    if not modules:
        return
    cache = sys.modules[_INDUCTOR_CODE_CACHE].PyCodeCache
    gone = {id(m) for m in modules}
    cache.modules[:] = [m for m in cache.modules if id(m) not in gone]
    by_path = getattr(cache, "modules_no_attr", {})
    for path, module in list(by_path.items()):
        if id(module) in gone:
            del by_path[path]
            getattr(cache, "linemaps", {}).pop(path, None)
    for module in modules:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]


def _drop_tracked_fakes(shape_envs: list[weakref.ref[ShapeEnv]]) -> None:
    """Drop the fake inputs each ShapeEnv tracked for producing guards (done once compiled): a fake view among them
    keeps the whole trace alive (see the module docstring)."""
    for ref in shape_envs:
        shape_env = ref()
        if shape_env is not None:
            shape_env.tracked_fakes = None
