"""Name -> Pass class. Built-in passes are imported lazily from `kvsurgery.passes`; users add their own
with `register_pass` and they compose with the built-ins without any core edit."""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from kvsurgery.errors import RecipeError
from kvsurgery.pass_base import CAPABILITIES, PHASES, PRODUCTS, Pass

_REGISTRY: dict[str, type[Pass]] = {}
_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a Pass usable by name in recipes."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if getattr(cls, "phase", None) not in PHASES:
        raise RecipeError(f"{cls.__name__}.phase must be one of {PHASES}, got {getattr(cls, 'phase', None)!r}")
    _check_vocabulary(cls, "provides", CAPABILITIES)  # (an unmet `requires` is refused when a recipe is built)
    _check_vocabulary(cls, "excludes", CAPABILITIES)
    _check_vocabulary(cls, "products", PRODUCTS)
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise RecipeError(f"a pass named '{name}' is already registered ({_REGISTRY[name].__module__})")
    _REGISTRY[name] = cls
    return cls


def _check_vocabulary(cls: type[Pass], attribute: str, known: dict[str, str]) -> None:
    """Refuse a declared capability or product the manager does not know (a typo would otherwise pass silently)."""
    for word in sorted(getattr(cls, attribute)):
        if word not in known:
            close = difflib.get_close_matches(word, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(
                f"{cls.__name__}.{attribute} names {word!r}{hint}, which is not one of: {', '.join(sorted(known))}"
            )


def _load_builtins() -> None:
    """Import every module of `kvsurgery.passes` once (each registers its pass)."""
    global _loaded
    if not _loaded:
        _loaded = True
        package = importlib.import_module("kvsurgery.passes")
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"kvsurgery.passes.{module.name}")


def get(name: str) -> type[Pass]:
    _load_builtins()
    if name not in _REGISTRY or _REGISTRY[name].core:
        names = sorted(n for n, cls in _REGISTRY.items() if not cls.core)
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RecipeError(f"unknown pass '{name}'.{hint} Known passes: {', '.join(names)}.")
    return _REGISTRY[name]


def core(name: str) -> type[Pass]:
    _load_builtins()
    return _REGISTRY[name]


def recipes() -> dict[str, str]:
    """Every pass a recipe can name, with a one-line description."""
    _load_builtins()
    return {name: cls.summary() for name, cls in sorted(_REGISTRY.items()) if not cls.core}
