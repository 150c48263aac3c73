"""How a kvsurgery op is declared: one `OpDef` gives its schema, fake, CPU implementation and CUDA kernel.

An op's parameters are names. A store tensor is named bare (its type comes from `kvsurgery.store.STORE_TENSORS`, the
one declaration of what a layer's store holds); any other parameter carries its schema type ("Tensor q", "int
window"). The implementation (the PyTorch reference), the fake and the CUDA kernel each take the op's arguments by
name, so none of them repeats the list: each names only the parameters it reads, and takes the op's store tensors
as one `s: LayerTensors` (`s.k_store`, ...). The schema stays flat tensors, as torch.library, Inductor and CUDA graphs
want it; only the Python side sees one object.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvsurgery.store import STORE_TENSORS, LayerTensors

NAMESPACE = "kvsurgery"
_SYMBOLIC = {"int": "SymInt", "int[]": "SymInt[]"}  # ints may be symbolic under Dynamo (as torch infers them)


@dataclass(frozen=True)
class OpDef:
    """One custom op `torch.ops.kvsurgery.<name>`: parameters, what it returns and mutates, and how it runs."""

    name: str
    params: tuple[str, ...]  # store tensor names bare, others "<schema type> <name>" ("int" becomes SymInt)
    impl: Callable[..., Any]  # the CPU implementation (the reference), called with the arguments by name
    fake: Callable[..., Any] | None = None  # output shapes for Dynamo/Inductor; None for ops that return nothing
    returns: str = "()"  # schema return type: "()", "Tensor" or "(Tensor, Tensor)"
    writes: tuple[str, ...] = ()  # parameters mutated in place

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.split()[-1] for p in self.params)

    @property
    def store_names(self) -> tuple[str, ...]:
        """The store tensors it takes: its bare (untyped) parameters."""
        return tuple(p for p in self.params if " " not in p)

    def schema(self) -> str:
        """The `torch.library` schema, e.g. "(Tensor(a0!) k_store, ..., Tensor q, float scale) -> Tensor"."""
        unknown = set(self.writes) - set(self.names)
        if unknown:
            raise ValueError(f"op {self.name!r} writes {sorted(unknown)}, which are not among its parameters")
        out = []
        for i, param in enumerate(self.params):
            kind, _, name = param.rpartition(" ")
            if not kind:
                if name not in STORE_TENSORS:
                    raise ValueError(f"op {self.name!r}: {name!r} is neither a store tensor nor typed ('Tensor x')")
                kind = STORE_TENSORS[name]
            if name in self.writes:
                kind = kind.replace("Tensor", f"Tensor(a{i}!)", 1)
            out.append(f"{_SYMBOLIC.get(kind, kind)} {name}")
        return f"({', '.join(out)}) -> {self.returns}"


SCORE_PARAMS = ("Tensor q", "Tensor k", "Tensor? mask", "float scale")  # what every prefill scoring op reads
STORE_ARG = "s"  # the parameter that receives the op's store tensors as one LayerTensors


def by_name(fn: Callable[..., Any], names: tuple[str, ...], op: str) -> Callable[..., Any]:
    """`fn` called with the op's positional arguments bound to their names (only those `fn` takes); a parameter `s`
    gets the op's store tensors as one `LayerTensors`."""
    params = inspect.signature(fn).parameters
    store = tuple(n for n in names if n in STORE_TENSORS) if STORE_ARG in params else ()
    if STORE_ARG in params and not store:
        raise TypeError(f"{fn.__qualname__} takes the store ({STORE_ARG!r}), but op {op!r} takes no store tensor")
    takes_rest = any(p.kind is p.VAR_KEYWORD for p in params.values())
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD and n not in names and n != STORE_ARG
    ]
    if missing:
        raise TypeError(f"{fn.__qualname__} needs {missing}, which op {op!r} does not take")
    wanted = (set(names) if takes_rest else set(params) & set(names)) - set(store)

    def call(*args):
        bound = dict(zip(names, args, strict=True))
        kwargs = {n: bound[n] for n in names if n in wanted}
        if store:
            kwargs[STORE_ARG] = LayerTensors(**{n: bound[n] for n in store})
        return fn(**kwargs)

    call.__name__ = call.__qualname__ = fn.__name__
    return call


def define(op: OpDef) -> None:
    """Register `op` with torch.library: schema, CPU implementation and fake."""
    custom = torch.library.custom_op(
        f"{NAMESPACE}::{op.name}", by_name(op.impl, op.names, op.name), mutates_args=op.writes, schema=op.schema()
    )
    fake = op.fake if op.fake is not None else _returns_nothing
    custom.register_fake(by_name(fake, op.names, op.name))
    if op.writes:
        _lean_version_bump(op)


@functools.cache
def _overrides() -> torch.library.Library:
    """The library kvsurgery's kernel overrides are registered in (they live as long as it does)."""
    return torch.library.Library(NAMESPACE, "IMPL")


def _lean_version_bump(op: OpDef) -> None:
    """Replace custom_op's ADInplaceOrView kernel of a mutating op by one that bumps the same version counters.

    custom_op's kernel first rebuilds the full argument list, reading the schema's argument list once per argument
    (`torch._library.utils.fill_defaults`), a cost every eager call and every op a compiled CPU graph keeps pays:
    0.14-0.19 ms a call of the 19-parameter no-op flush, against 0.03 ms with this kernel, which indexes the written
    arguments (torch 2.13, the 2-core box).
    """
    overload = getattr(torch.ops.kvsurgery, op.name).default
    written = [i for i, a in enumerate(overload._schema.arguments) if a.alias_info and a.alias_info.is_write]

    def bump_then_run(keyset, *args, **kwargs):
        for i in written:
            if i < len(args) and isinstance(args[i], torch.Tensor):
                torch.autograd.graph.increment_version(args[i])
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return overload(*args, **kwargs)

    with warnings.catch_warnings():  # the override is the point: torch warns about every override
        warnings.filterwarnings("ignore", message=".*[Oo]verrid", category=UserWarning)
        _overrides().impl(op.name, bump_then_run, "ADInplaceOrView", with_keyset=True)


def register_cuda(op: OpDef, kernel: Callable[..., Any]) -> None:
    """Make `kernel` (taking the op's arguments by name) the CUDA implementation of `op`."""
    torch.library.register_kernel(f"{NAMESPACE}::{op.name}", "cuda", by_name(kernel, op.names, op.name))


def _returns_nothing(**_) -> None:
    return None


# -- fakes shared by several ops ------------------------------------------------------------------------------
def like_q(q: torch.Tensor, **_) -> torch.Tensor:
    """Decode attention output: the queries' shape and dtype."""
    return torch.empty_like(q)


def token_scores(k: torch.Tensor, **_) -> torch.Tensor:
    """Token scores [B, Hkv, T] float32 of the new keys k [B, Hkv, T, D]."""
    b, n_kv, t, _ = k.shape
    return k.new_empty((b, n_kv, t), dtype=torch.float32)
