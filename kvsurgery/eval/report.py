"""Results out of records: accuracy per (recipe, budget, task, length), a markdown table, a PNG plot of
accuracy vs cache bytes per recipe, and a per-prompt comparison of two recipes (e.g. snapkv vs kvpress)."""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict
from statistics import mean

from kvsurgery.eval.harness import Record

MIB = 2.0**20


def summarize(records: list[Record]) -> list[dict]:
    """One row per (recipe, budget): accuracy per task/length cell and overall, bytes, kept fraction, n."""
    runs: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        runs[(r.recipe, r.budget)].append(r)
    rows = []
    for (recipe, budget), recs in runs.items():
        cells: dict[str, list[float]] = defaultdict(list)
        for r in recs:
            cells[f"{r.task}@{r.length}"].append(r.score)
        rows.append(
            {
                "recipe": recipe,
                "budget": budget,
                "accuracy": mean(r.score for r in recs),
                "cells": {k: {"accuracy": mean(v), "n": len(v)} for k, v in sorted(cells.items())},
                "n": len(recs),
                "cache_bytes": mean(r.cache_bytes for r in recs),
                "full_bytes": mean(r.full_bytes for r in recs),
                "kept_fraction": mean(r.kept_tokens / r.n_tokens for r in recs),
                "seconds": mean(r.seconds for r in recs),
            }
        )
    return sorted(rows, key=lambda row: (row["recipe"] != "full", row["recipe"], row["budget"] or 0))


def compare(records: list[Record], a: str, b: str) -> list[dict]:
    """Per budget: how often recipes `a` and `b` give the same answer / score on the same prompt, and (when
    kept indices were dumped) the mean Jaccard overlap of their kept token sets per layer and KV head."""
    by = {(r.recipe, r.budget, r.key): r for r in records}
    out = []
    for budget in sorted({r.budget for r in records if r.recipe == a and r.budget is not None}):
        pairs = [(ra, by.get((b, budget, ra.key))) for ra in records if ra.recipe == a and ra.budget == budget]
        pairs = [(x, y) for x, y in pairs if y is not None]
        if not pairs:
            continue
        row = {
            "budget": budget,
            "n": len(pairs),
            "same_answer": mean(float(x.prediction.strip() == y.prediction.strip()) for x, y in pairs),
            "same_score": mean(float(x.score == y.score) for x, y in pairs),
            "accuracy_a": mean(x.score for x, _ in pairs),
            "accuracy_b": mean(y.score for _, y in pairs),
            "kept_a": mean(x.kept_tokens for x, _ in pairs),
            "kept_b": mean(y.kept_tokens for _, y in pairs),
        }
        jaccards = [_jaccard(x.kept, y.kept) for x, y in pairs if x.kept and y.kept]
        if jaccards:
            row["kept_jaccard"] = mean(jaccards)
            row["kept_jaccard_min"] = min(jaccards)
        out.append(row)
    return out


def _jaccard(a: list, b: list) -> float:
    """Mean over layers and KV heads of |A ∩ B| / |A ∪ B| of kept prompt-token indices."""
    values = []
    for layer_a, layer_b in zip(a, b, strict=True):
        for head_a, head_b in zip(layer_a, layer_b, strict=True):
            sa, sb = set(head_a), set(head_b)
            values.append(len(sa & sb) / max(1, len(sa | sb)))
    return mean(values)


def markdown(rows: list[dict], comparisons: dict[str, list[dict]] | None = None) -> str:
    cells = sorted({c for row in rows for c in row["cells"]}, key=lambda c: (int(c.split("@")[1]), c))
    head = ["recipe", "budget", "avg", *cells, "cache MiB", "of full", "kept", "n/cell", "s/prompt"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        n_cell = sorted({c["n"] for c in row["cells"].values()})
        values = [
            row["recipe"],
            "–" if row["budget"] is None else f"{row['budget']:.0%}",
            f"**{100 * row['accuracy']:.1f}**",
            *(f"{100 * row['cells'][c]['accuracy']:.0f}" if c in row["cells"] else "" for c in cells),
            f"{row['cache_bytes'] / MIB:.2f}",
            f"{row['cache_bytes'] / row['full_bytes']:.0%}",
            f"{row['kept_fraction']:.0%}",
            "/".join(map(str, n_cell)),
            f"{row['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(values) + " |")
    for title, comp in (comparisons or {}).items():
        if not comp:
            continue
        lines += ["", f"Per-prompt comparison, {title}:", ""]
        lines += [
            "| budget | n | same answer | same score | acc A | acc B | kept/head A | kept/head B | kept Jaccard |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        for c in comp:
            jac = f"{c['kept_jaccard']:.3f} (min {c['kept_jaccard_min']:.3f})" if "kept_jaccard" in c else "–"
            lines.append(
                f"| {c['budget']:.0%} | {c['n']} | {c['same_answer']:.0%} | {c['same_score']:.0%} | "
                f"{100 * c['accuracy_a']:.1f} | {100 * c['accuracy_b']:.1f} | {c['kept_a']:.1f} | {c['kept_b']:.1f} | "
                f"{jac} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Accuracy vs cache bytes, one line per recipe over its budgets (kvpress dashed), full as a star."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the accuracy plot needs matplotlib: pip install 'kvsurgery[plot]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    by_recipe: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_recipe[row["recipe"]].append(row)
    for recipe, recs in sorted(by_recipe.items()):
        recs = sorted(recs, key=lambda r: r["cache_bytes"])
        x = [r["cache_bytes"] / MIB for r in recs]
        y = [100 * r["accuracy"] for r in recs]
        if len(recs) == 1 and recs[0]["budget"] is None:
            ax.plot(x, y, marker="*", markersize=14, linestyle="none", label=recipe, color="black")
            continue
        style = "--" if recipe.startswith("kvpress:") else "-"
        ax.plot(x, y, style, marker="o", label=recipe)
    ax.set_xlabel("KV cache bytes per prompt (MiB, mean)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: pathlib.Path, records: list[Record], meta: dict, compare_pairs: list[tuple[str, str]]) -> dict:
    """results.json (meta, summary rows, comparisons, every record), table.md and accuracy_vs_bytes.png."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    comparisons = {f"{a} (A) vs {b} (B)": compare(records, a, b) for a, b in compare_pairs}
    (out / "results.json").write_text(
        json.dumps(
            {"meta": meta, "summary": rows, "comparisons": comparisons, "records": [r.to_json() for r in records]},
            indent=1,
        )
    )
    (out / "table.md").write_text(markdown(rows, comparisons))
    plot(rows, out / "accuracy_vs_bytes.png", f"{meta.get('model', '')}: accuracy vs KV cache bytes")
    return {"rows": rows, "comparisons": comparisons}
