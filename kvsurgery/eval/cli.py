"""`kvsurgery eval`: accuracy of recipes on RULER-style synthetic tasks at given context lengths and budgets.

    kvsurgery eval --model smollm2-135m --recipes full,snapkv,pyramidkv --budgets 0.1,0.2,0.5 \\
        --tasks passkey,niah_single --lengths 1024,2048 --n 50 --out results/ [--kvpress snapkv,streaming]

Writes results.json (every prompt's answer and score), table.md and accuracy_vs_bytes.png into --out, after
every recipe (an interrupted run keeps what it finished).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import pathlib
import platform
import sys

from kvsurgery.eval.tasks import TASKS


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses, so recipe options survive: 'a,b(x=1,y=2)' -> ['a', 'b(x=1,y=2)']."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    items.append(current.strip())
    return [item for item in items if item]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="packaged model name or a local transformers folder")
    parser.add_argument("--recipes", default="full,snapkv", help="comma-separated recipes; 'kvpress:NAME' runs kvpress")
    parser.add_argument("--budgets", default="0.1,0.2,0.5", help="comma-separated budget fractions in (0, 1]")
    parser.add_argument("--tasks", default="passkey,niah_single", help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--lengths", default="1024,2048", help="comma-separated context lengths in tokens")
    parser.add_argument("--n", type=int, default=10, help="samples per task and length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--question-first", action="store_true", help="ask the question before the context too")
    parser.add_argument(
        "--kvpress", default="", help="kvpress presses to add side by side, e.g. snapkv,streaming,expected,adakv"
    )
    parser.add_argument("--kvpress-python", default=None, help="python of the kvpress environment")
    parser.add_argument(
        "--dump-kept", action="store_true", help="record kept token indices (per-prompt comparison with kvpress)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="results", help="output folder")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="run nothing: merge the results.json of earlier runs (e.g. kvsurgery and kvpress) into --out",
    )


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from kvsurgery import models
    from kvsurgery.eval import harness, kvpress_adapter, report, tasks

    if importlib.util.find_spec("matplotlib") is None:
        print("kvsurgery eval draws its plot with matplotlib: pip install 'kvsurgery[plot]'", file=sys.stderr)
        return 2
    if args.merge:
        return _merge(args.merge, pathlib.Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = _split(args.recipes) + [f"kvpress:{p}" for p in _split(args.kvpress)]
    budgets = [float(b) for b in _split(args.budgets)]
    if any(not 0 < b <= 1 for b in budgets):
        print(f"kvsurgery eval: budgets are fractions in (0, 1], got {args.budgets}", file=sys.stderr)
        return 2
    task_names = _split(args.tasks)
    unknown = [t for t in task_names if t not in TASKS]
    if unknown:
        print(f"kvsurgery eval: unknown task(s) {unknown}; known: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    runs = [(r, b) for r in recipes for b in (budgets if _takes_budget(r) else [None])]
    press_python = (
        kvpress_adapter.python_path(args.kvpress_python)
        if any(kvpress_adapter.is_kvpress(r) for r, _ in runs)
        else None
    )

    model, tokenizer = models.load_model(args.model)
    model_dir = str(models.cache_dir() / args.model / "hf") if args.model in models.PACKAGED else args.model
    samples = [
        s
        for task in task_names
        for length in (int(x) for x in _split(args.lengths))
        for s in tasks.generate(tokenizer, task, length, args.n, args.seed, args.question_first)
    ]
    out = pathlib.Path(args.out)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "kvsurgery eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]),
        "model": args.model,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "tasks": task_names,
        "n": args.n,
        "seed": args.seed,
        "question_first": args.question_first,
    }
    compare_pairs = [(r, f"kvpress:{r}") for r, _ in runs if f"kvpress:{r}" in recipes]
    records: list[harness.Record] = []
    with tqdm(total=len(runs) * len(samples), desc="kvsurgery eval", unit="prompt") as bar:
        for recipe, budget in runs:
            bar.set_postfix_str(f"{recipe} @ {budget}")
            if kvpress_adapter.is_kvpress(recipe):
                records += kvpress_adapter.run_presses(
                    model, model_dir, tokenizer, samples, [(recipe, budget)], press_python, bar, args.dump_kept
                )
            else:
                records += harness.run_recipe(model, tokenizer, samples, recipe, budget, bar, args.dump_kept)
            result = report.write(out, records, meta, compare_pairs)
    print(report.markdown(result["rows"], result["comparisons"]))
    print(f"written: {out / 'results.json'}, {out / 'table.md'}, {out / 'accuracy_vs_bytes.png'}")
    return 0


def _takes_budget(recipe: str) -> bool:
    """Whether a recipe selects tokens (runs once per budget) or keeps them all (`full`, `kivi2`: runs once)."""
    from kvsurgery.eval import kvpress_adapter
    from kvsurgery.manager import selects_tokens

    if kvpress_adapter.is_kvpress(recipe):
        return recipe != "kvpress:full"
    return selects_tokens(recipe)


def _merge(folders: list[str], out: pathlib.Path) -> int:
    """One report from several runs' records (same seed, so the same prompts); later folders win on duplicates."""
    import json

    from kvsurgery.eval import report
    from kvsurgery.eval.harness import Record

    records: dict[tuple, Record] = {}
    metas = []
    for folder in folders:
        data = json.loads((pathlib.Path(folder) / "results.json").read_text())
        metas.append(data["meta"])
        for raw in data["records"]:
            record = Record(**raw)
            records[(record.recipe, record.budget, record.key)] = record
    recipes = {r.recipe for r in records.values()}
    pairs = [(r, f"kvpress:{r}") for r in sorted(recipes) if f"kvpress:{r}" in recipes]
    meta = {**metas[0], "merged_from": metas}
    result = report.write(out, list(records.values()), meta, pairs)
    print(report.markdown(result["rows"], result["comparisons"]))
    return 0
