"""Side-by-side rows from kvpress: runs `kvpress_runner.py` in a separate environment (kvpress pins
transformers<5.3) on the very token ids kvsurgery sees, and turns its answers into the same records.

Recipes are written `kvpress:NAME` or `kvpress:NAME(window=32,kernel=5)`; the defaults below mirror the
matching kvsurgery recipe (kvpress offers only average pooling, so max-pool settings cannot be matched).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from kvsurgery.eval.harness import Record, kv_bytes_per_token, sample_key
from kvsurgery.eval.tasks import Sample, score
from kvsurgery.recipe import parse as parse_recipe

PREFIX = "kvpress:"
RUNNER = pathlib.Path(__file__).with_name("kvpress_runner.py")
DEFAULT_PYTHON = "/work/venvs/kvpress/bin/python"

# kvsurgery snapkv: window 32, kernel 5, avg; adakv/pyramidkv score with window 8, kernel 7 (max pool there).
PRESS_DEFAULTS: dict[str, dict] = {
    "full": {},
    "snapkv": {"window": 32, "kernel": 5},
    "adakv": {"window": 8, "kernel": 7, "floor": 0.2},
    "pyramidkv": {"window": 8, "kernel": 7, "beta": 20},
    "streaming": {"sinks": 4},
    "expected": {},
    "knorm": {},
}


def is_kvpress(recipe: str) -> bool:
    return recipe.startswith(PREFIX)


def parse(recipe: str) -> tuple[str, dict]:
    """'kvpress:snapkv(window=8)' -> ('snapkv', {'window': 8, 'kernel': 5})."""
    specs = parse_recipe(recipe[len(PREFIX) :])
    if len(specs) != 1 or specs[0].name not in PRESS_DEFAULTS:
        raise ValueError(f"{recipe!r} is not one kvpress press; known: {', '.join(PRESS_DEFAULTS)}")
    return specs[0].name, {**PRESS_DEFAULTS[specs[0].name], **specs[0].options}


def python_path(explicit: str | None = None) -> str:
    """The kvpress environment's python: --kvpress-python, $KVSURGERY_KVPRESS_PYTHON, or /work/venvs/kvpress."""
    path = explicit or os.environ.get("KVSURGERY_KVPRESS_PYTHON") or DEFAULT_PYTHON
    if not pathlib.Path(path).exists():
        raise FileNotFoundError(
            f"no kvpress environment at {path}: create one with `python -m venv VENV && VENV/bin/pip install "
            "torch==2.13.0 && VENV/bin/pip install kvpress 'transformers>=4.56,<5.3'`, then pass "
            "--kvpress-python VENV/bin/python (or set KVSURGERY_KVPRESS_PYTHON)"
        )
    return path


def run_presses(
    model,
    model_dir: str,
    tokenizer,
    samples: list[Sample],
    runs: list[tuple[str, float | None]],
    python: str,
    progress=None,
    dump_kept: bool = False,
) -> list[Record]:
    """Run every (kvpress recipe, budget) on every sample in one subprocess; returns records like run_recipe's."""
    from kvsurgery.eval.harness import decode_room, keep_tokens

    room = decode_room(samples)
    per_token = kv_bytes_per_token(model)
    ids = {sample_key(s.task, s.length, s.index): tokenizer(s.prompt).input_ids for s in samples}
    by_key = {sample_key(s.task, s.length, s.index): s for s in samples}
    records: list[Record] = []
    for recipe, budget in runs:
        name, options = parse(recipe)
        job = {
            "model": model_dir,
            "dump_kept": dump_kept,
            "jobs": [{"label": recipe, "press": name, "options": options}],
            "samples": [
                {
                    "key": key,
                    "ids": ids[key],
                    "max_new_tokens": s.max_new_tokens,
                    "keep": keep_tokens(budget if name != "full" else None, len(ids[key])),
                }
                for key, s in by_key.items()
            ],
        }
        for row in _subprocess(python, job, progress):
            s = by_key[row["key"]]
            prediction = tokenizer.decode(row["generated"], skip_special_tokens=True)
            n_tokens = len(ids[row["key"]])
            records.append(
                Record(
                    recipe=recipe,
                    budget=budget if name != "full" else None,
                    task=s.task,
                    length=s.length,
                    index=s.index,
                    n_tokens=n_tokens,
                    prediction=prediction,
                    score=score(s.scoring, prediction, s.answers),
                    cache_bytes=row["cache_bytes"],
                    full_bytes=(n_tokens + room) * per_token,
                    kept_tokens=row["kept_tokens"],
                    seconds=row["seconds"],
                    kept=row.get("kept"),
                )
            )
    return records


def _subprocess(python: str, job: dict, progress) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="kvsurgery-kvpress-") as tmp:
        job_path, out_path = pathlib.Path(tmp, "job.json"), pathlib.Path(tmp, "results.jsonl")
        job_path.write_text(json.dumps(job))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        with open(pathlib.Path(tmp, "stderr.txt"), "w+") as err:
            proc = subprocess.Popen(
                [python, str(RUNNER), str(job_path), str(out_path)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
            for line in proc.stdout:
                if line.startswith("done") and progress is not None:
                    progress.update(1)
            if proc.wait() != 0:
                err.seek(0)
                sys.stderr.write(err.read()[-4000:])
                raise RuntimeError(f"kvpress runner failed (exit {proc.returncode}); its stderr is above")
        return [json.loads(line) for line in out_path.read_text().splitlines() if line.strip()]
