"""Quickstart: compress the KV cache of the real SmolLM2-135M and ask it for a passkey hidden in ~1K tokens.

    python examples/quickstart.py

Prints each recipe's answer, the cache it allocated, and what the surgery did to the model's graphs.
"""

from __future__ import annotations

import random
import time

import torch

import kvsurgery
from kvsurgery.models import load_model

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
RECIPES = [("full", None), ("snapkv(window=8,kernel=7,pool=max)", 0.2), ("pyramidkv", 0.2), ("streaming", 0.2)]


def passkey_prompt(key: int, repeats: int = 40, depth: float = 0.4) -> str:
    before = int(repeats * depth)
    return (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        + FILLER * before
        + f"The pass key is {key}. Remember it. {key} is the pass key. "
        + FILLER * (repeats - before)
        + "What is the pass key? The pass key is"
    )


def main() -> None:
    torch.manual_seed(0)
    print("loading SmolLM2-135M (first run converts the packaged GGUF once, ~30 s)...")
    model, tokenizer = load_model("smollm2-135m")
    key = random.Random(1).randint(10000, 99999)
    ids = tokenizer(passkey_prompt(key), return_tensors="pt").input_ids
    print(f"prompt: {ids.shape[1]} tokens, hidden pass key {key}\n")
    print(f"{'recipe':38s} {'budget':>6s}  {'answer':22s} {'cache MiB':>9s}  {'seconds':>7s}")
    for recipe, budget in RECIPES:
        kvsurgery.apply(model, recipe, budget=budget)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        seconds = time.perf_counter() - start
        answer = tokenizer.decode(out[0, ids.shape[1] :]).strip()
        explanation = kvsurgery.explain(model)
        mib = explanation.store_bytes / 2**20
        print(f"{recipe:38s} {budget or '-'!s:>6s}  {answer[:22]!r:22s} {mib:9.2f}  {seconds:7.1f}")
        if recipe.startswith("pyramidkv"):
            last = explanation
        kvsurgery.restore(model)
    print("\nWhat the surgery did (pyramidkv):\n")
    print(last)


if __name__ == "__main__":
    main()
