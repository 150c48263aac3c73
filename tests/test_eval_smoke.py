"""`kvsurgery eval` end to end on a few short prompts of the real SmolLM2-135M, the report files, and (when the
kvpress environment exists) kvsurgery's snapkv against kvpress's SnapKVPress on the identical prompt."""

import json
import os
import pathlib

import pytest

from kvsurgery.eval import harness, kvpress_adapter, report, tasks
from kvsurgery.eval.harness import Record


def _record(recipe, budget, index, score, kept=None, prediction="x"):
    return Record(recipe, budget, "passkey", 256, index, 250, prediction, score, 100, 400, 50.0, 1.0, kept)


def test_report_summary_table_comparison_and_plot(tmp_path):
    records = [
        _record("full", None, 0, 1.0),
        _record("full", None, 1, 1.0),
        _record("snapkv", 0.2, 0, 1.0, [[[1, 2, 3]]], "12345"),
        _record("snapkv", 0.2, 1, 0.0, [[[1, 2, 3]]], "no"),
        _record("kvpress:snapkv", 0.2, 0, 1.0, [[[1, 2, 4]]], "12345"),
        _record("kvpress:snapkv", 0.2, 1, 1.0, [[[1, 2, 3]]], "12345"),
    ]
    result = report.write(tmp_path, records, {"model": "m"}, [("snapkv", "kvpress:snapkv")])
    rows = {(r["recipe"], r["budget"]): r for r in result["rows"]}
    assert rows[("snapkv", 0.2)]["accuracy"] == 0.5
    assert rows[("snapkv", 0.2)]["cells"] == {"passkey@256": {"accuracy": 0.5, "n": 2}}
    assert rows[("full", None)]["kept_fraction"] == 50 / 250
    (comp,) = result["comparisons"]["snapkv (A) vs kvpress:snapkv (B)"]
    assert (comp["n"], comp["same_answer"], comp["same_score"]) == (2, 0.5, 0.5)
    assert comp["kept_jaccard"] == pytest.approx((0.5 + 1.0) / 2)
    table = (tmp_path / "table.md").read_text()
    assert "| snapkv | 20% | **50.0** |" in table and "kept Jaccard" in table
    assert json.loads((tmp_path / "results.json").read_text())["records"][2]["kept"] == [[[1, 2, 3]]]
    assert (tmp_path / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"


def test_kvpress_recipe_names_and_budget_rounding():
    assert kvpress_adapter.parse("kvpress:snapkv") == ("snapkv", {"window": 32, "kernel": 5})
    assert kvpress_adapter.parse("kvpress:snapkv(window=8,kernel=7)") == ("snapkv", {"window": 8, "kernel": 7})
    with pytest.raises(ValueError, match="known"):
        kvpress_adapter.parse("kvpress:h2o")
    # kvsurgery keeps ceil(budget * T); kvpress keeps int(T * (1 - ratio)) with the ratio the runner sets
    for n_tokens in (250, 1021, 2048):
        keep = harness.keep_tokens(0.2, n_tokens)
        ratio = 1.0 - (keep + 0.5) / n_tokens
        assert int(n_tokens * (1 - ratio)) == keep == -(-n_tokens // 5)


SMOKE_RECIPE = "snapkv(window=8,kernel=7,pool=max)"


@pytest.fixture(scope="module")
def smoke_runs(smollm2):
    """snapkv at 50% on two 256-token passkey prompts (kept tokens recorded): one apply, so the smoke stays well
    under a minute."""
    model, tokenizer = smollm2
    samples = tasks.generate(tokenizer, "passkey", 256, n=2, seed=0)
    return samples, harness.run_recipe(model, tokenizer, samples, SMOKE_RECIPE, 0.5, dump_kept=True)


@pytest.mark.real_model
def test_eval_smoke_on_real_model(smollm2, smoke_runs, tmp_path):
    model, _ = smollm2
    _, snap = smoke_runs
    assert "_kvsurgery" not in model.__dict__  # restored
    assert [r.score for r in snap] == [1.0, 1.0], [r.prediction for r in snap]
    for s in snap:
        assert s.kept_tokens == harness.keep_tokens(0.5, s.n_tokens)
        assert s.cache_bytes < 0.6 * s.full_bytes
        assert all(len(head) == s.kept_tokens for layer in s.kept for head in layer)
    report.write(tmp_path, snap, {"model": "smollm2-135m"}, [])
    assert f"| {SMOKE_RECIPE} | 50% | **100.0** |" in (tmp_path / "table.md").read_text()


@pytest.mark.real_model
def test_kvpress_snapkv_keeps_the_same_tokens_as_ours(smollm2):
    """Runs only where the kvpress environment exists (docs/eval.md): the same algorithm must keep the same tokens."""
    python = os.environ.get("KVSURGERY_KVPRESS_PYTHON", kvpress_adapter.DEFAULT_PYTHON)
    if not pathlib.Path(python).exists():
        pytest.skip(f"no kvpress environment at {python} (see docs/eval.md)")
    from kvsurgery import models

    model, tokenizer = smollm2
    samples = tasks.generate(tokenizer, "passkey", 256, n=1, seed=0)
    (ours,) = harness.run_recipe(model, tokenizer, samples, "snapkv(window=8,kernel=7)", 0.5, dump_kept=True)
    folder = str(models.cache_dir() / "smollm2-135m" / "hf")
    press = kvpress_adapter.run_presses(
        model, folder, tokenizer, samples, [("kvpress:snapkv(window=8,kernel=7)", 0.5)], python, dump_kept=True
    )
    (theirs,) = press
    assert theirs.kept == ours.kept  # the same tokens of every layer and KV head (kvpress pools by average only)
    assert theirs.prediction == ours.prediction
