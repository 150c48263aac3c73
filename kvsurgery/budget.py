"""The user's budget: tokens kept per KV head (int) or a fraction of the prompt length (float in (0, 1])."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsurgery.errors import BudgetError


@dataclass(frozen=True)
class Budget:
    """Tokens each KV head keeps after prefill, sinks and recent window included (an average when per-head)."""

    tokens: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, value) -> Budget:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BudgetError(
                "budget must be an int (tokens per KV head) or a float in (0, 1] (fraction of the prompt), "
                f"got {value!r}"
            )
        if value <= 0:
            raise BudgetError(f"budget must be > 0, got {value}: pass e.g. budget=256 or budget=0.2")
        if isinstance(value, float):
            if value > 1:
                raise BudgetError(
                    f"a float budget is a fraction of the prompt and must be <= 1, got {value}; "
                    f"for a token count pass an int (budget={int(value)})"
                )
            return cls(fraction=float(value))
        return cls(tokens=int(value))

    def resolve(self, prompt_len: int) -> int:
        """Tokens per KV head for a prompt of `prompt_len` tokens."""
        if self.tokens is not None:
            return self.tokens
        return max(1, math.ceil(self.fraction * prompt_len))

    def __str__(self) -> str:
        return f"{self.tokens} tokens" if self.tokens is not None else f"{self.fraction:g} of the prompt"
