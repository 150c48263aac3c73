"""Parse recipe text: pass names joined by "+", each with optional inline options, e.g.

    "snapkv"    "pyramidkv+kivi2"    "snapkv(window=16,kernel=7,pool=max)+quant1bit"

Option values are ints, floats, true/false, or bare words and file paths (strings without spaces, commas,
parentheses or "+"), e.g. "headkv(calibration=runs/headkv.json)".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvsurgery.errors import RecipeError

_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_\-]*)\s*(?:\((.*)\))?\s*$")
_OPTION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([^=]+?)\s*$")


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict = field(default_factory=dict)


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if re.fullmatch(r"[A-Za-z0-9_\-./~:]+", text):
        return text
    raise RecipeError(
        f"cannot read option value {text!r}: use a number, true/false, a plain word or a path without spaces "
        "(pass other values as keyword options to apply)"
    )


def parse(recipe: str) -> list[PassSpec]:
    """Split recipe text into pass specs, in the order written."""
    if not isinstance(recipe, str) or not recipe.strip():
        raise RecipeError(f"a recipe is a non-empty string like 'snapkv' or 'snapkv+kivi2', got {recipe!r}")
    specs = []
    for term in _split_terms(recipe):
        match = _TERM.match(term)
        if match is None:
            raise RecipeError(
                f"cannot parse {term.strip()!r} in recipe {recipe!r}: expected name or name(key=value,...)"
            )
        name, body = match.group(1).lower(), match.group(2)
        options = {}
        for item in filter(str.strip, (body or "").split(",")):
            opt = _OPTION.match(item)
            if opt is None:
                raise RecipeError(f"cannot parse option {item.strip()!r} of '{name}' in {recipe!r}: expected key=value")
            options[opt.group(1)] = _value(opt.group(2))
        specs.append(PassSpec(name, options))
    return specs


def _split_terms(recipe: str) -> list[str]:
    """Split on '+' outside parentheses."""
    terms, depth, current = [], 0, ""
    for ch in recipe:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            raise RecipeError(f"unbalanced ')' in recipe {recipe!r}")
        if ch == "+" and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise RecipeError(f"unbalanced '(' in recipe {recipe!r}")
    terms.append(current)
    if any(not t.strip() for t in terms):
        raise RecipeError(f"empty pass name in recipe {recipe!r} (a '+' with nothing on one side)")
    return terms
