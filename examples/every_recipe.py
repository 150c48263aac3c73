"""Every recipe at a 20% budget on the real SmolLM2-135M: does it still answer, and does it still write sense?

    python examples/every_recipe.py --calibrations DIR [--prompt needle|continue] [--length 2048] [--new 48]
    python examples/every_recipe.py --prompt continue --recipes "snapkv+quant2bit(group=32)" kivi4

For each recipe, greedily: `--prompt needle` answers a ~2K-token needle prompt (the eval's `niah_single` task)
and the table shows whether the needle's number came out; `--prompt continue` writes on after ~2K tokens of plain
English sentences, a free continuation whose coherence can be read. Both show how many generated tokens equal
the full cache's greedy output, the cache allocated, and the text itself. Recipes that need calibration
read it from DIR (headkv.json, headkv-r2.json, prefixkv.json, channels.json: see the README's calibration
commands); the ones whose file is missing are listed and skipped. `--recipes` runs the given recipes (after `full`,
the reference) instead of the list; those that select tokens run at 20%, options and calibration paths inline.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

import torch
from tqdm import tqdm

import kvsurgery
from kvsurgery.calibration.haystack import filler_sentences
from kvsurgery.eval import tasks
from kvsurgery.manager import selects_tokens
from kvsurgery.models import load_model

BUDGET = 0.2
RECIPES = [
    ("full", None, None),
    ("snapkv", BUDGET, None),
    ("pyramidkv", BUDGET, None),
    ("adakv", BUDGET, None),
    ("h2o", BUDGET, None),
    ("streaming", BUDGET, None),
    ("headkv", BUDGET, "headkv.json"),
    ("headkv-r2", BUDGET, "headkv-r2.json"),
    ("prefixkv", BUDGET, "prefixkv.json"),
    ("doublesparse", BUDGET, "channels.json"),
    ("kivi2", None, None),
    ("kivi4", None, None),
    ("snapkv+quant1bit", BUDGET, None),
    ("snapkv+quant2bit", BUDGET, None),
    ("snapkv+kivi2", BUDGET, None),
    ("headkv+quant1bit", BUDGET, "headkv.json"),
]


def _plain_text(tokenizer, length: int, seed: int) -> str:
    """Plain English sentences (the calibration filler) up to about `length` tokens, ending mid-paragraph."""
    sentences = filler_sentences(random.Random(seed), 4 * length)
    text = ""
    for sentence in sentences:
        if len(tokenizer(text + sentence + " ").input_ids) > length:
            break
        text += sentence + " "
    return text.rstrip()


def _agreement(new: torch.Tensor, reference: torch.Tensor) -> int:
    """Generated tokens equal, position by position, to the full cache's (greedy) output."""
    n = min(len(new), len(reference))
    return int((new[:n] == reference[:n]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrations", default="artefacts", help="folder with the calibration artefacts")
    parser.add_argument("--prompt", choices=("needle", "continue"), default="needle")
    parser.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=48, help="tokens to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="every_recipe.json")
    parser.add_argument("--recipes", nargs="+", help="recipes to run instead of the list, e.g. 'kivi2(group=64)'")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    if args.prompt == "needle":
        (sample,) = tasks.generate(tokenizer, "niah_single", args.length, n=1, seed=args.seed)
        prompt, answers = sample.prompt, sample.answers
    else:
        prompt, answers = _plain_text(tokenizer, args.length, args.seed), ()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    folder = pathlib.Path(args.calibrations)
    recipes = RECIPES
    if args.recipes:
        recipes = [RECIPES[0]] + [(r, BUDGET if selects_tokens(r) else None, None) for r in args.recipes]
    runs = [(r, b, c) for r, b, c in recipes if c is None or (folder / c).exists()]
    missing = [r for r, _, c in recipes if c is not None and not (folder / c).exists()]
    if missing:
        print(f"skipped (no calibration in {folder}): {', '.join(missing)}")

    rows, reference = [], None
    for recipe, budget, calibration in tqdm(runs, desc="recipes", unit="recipe"):
        options = {"calibration": str(folder / calibration)} if calibration else {}
        kvsurgery.apply(model, recipe, budget=budget, max_new_tokens=args.new, **options)
        try:
            with torch.inference_mode():
                new = model.generate(ids, max_new_tokens=args.new, do_sample=False)[0, ids.shape[1] :]
            cache = kvsurgery.explain(model).store_bytes
        finally:
            kvsurgery.restore(model)
        reference = new if reference is None else reference
        text = tokenizer.decode(new, skip_special_tokens=True)
        rows.append(
            {
                "recipe": recipe,
                "budget": budget,
                "found": bool(answers) and tasks.score("substring", text, answers) == 1.0,
                "same_as_full": _agreement(new, reference),
                "cache_mib": cache / 2**20,
                "text": text,
            }
        )

    print(f"\nprompt: {ids.shape[1]} tokens ({args.prompt}, answer {answers or '-'}), {args.new} new tokens\n")
    print(f"| recipe | budget | needle | tokens equal to full | cache MiB | generated text |\n|{'---|' * 6}")
    for r in rows:
        text = r["text"].replace("\n", " ").replace("|", "/")
        print(
            f"| {r['recipe']} | {r['budget'] or '-'} | {'yes' if r['found'] else 'no'} | "
            f"{r['same_as_full']}/{args.new} | {r['cache_mib']:.2f} | {text} |"
        )
    pathlib.Path(args.out).write_text(json.dumps({"prompt_tokens": ids.shape[1], "rows": rows}, indent=1))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
