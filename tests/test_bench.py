"""`kvsurgery bench` smoke run on CPU (tiny shape, seconds): every metric is filled, unknown recipes are skipped
with their reason, the table is printed and the JSON written. CPU timings say nothing about GPU speed."""

import json

from kvsurgery import cli
from kvsurgery.bench.decode import _tokens


def test_bench_smoke_run_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    recipes = "full,snapkv(window=4),headkv+quant1bit,nosuchpass"
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--contexts", "48", "--batch", "1", "--budget", "0.25",
            "--recipes", recipes, "--new-tokens", "4", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["copy_bandwidth_gbps"] > 0 and data["meta"]["weight_bytes_per_step"] > 0
    rows = {(r["engine"], r["recipe"]): r for r in data["rows"]}
    measured = [
        rows[("hf", "full (dynamic cache)")],
        rows[("hf", "full (static cache)")],
        rows[("kvsurgery", "full")],
        rows[("kvsurgery", "snapkv(window=4)")],
        rows[("kvsurgery", "headkv+quant1bit")],  # synthetic head scores (random weights, speed only)
    ]
    for row in measured:
        assert row["status"] == "ok", row
        assert row["prefill_s"] > 0 and row["decode_ms"] > 0 and row["cache_gib"] > 0 and row["floor_ms"] > 0
        assert abs(row["tokens_per_s"] - 1e3 / row["decode_ms"]) < 1e-6 * row["tokens_per_s"]
        assert abs(row["of_floor"] - row["floor_ms"] / row["decode_ms"]) < 1e-9
        assert row["vs_hf_default"] > 0 and row["vs_hf_static"] > 0
        assert row["peak_gib"] is None  # peak memory is measured on CUDA only
        weights = data["meta"]["weight_bytes_per_step"]
        assert abs(row["step_mb"] * 1e6 - weights - row["cache_gib"] * 2**30) < 1, "a step reads weights + cache"
    assert measured[0]["vs_hf_default"] == 1.0
    assert measured[3]["cache_gib"] < measured[2]["cache_gib"], "snapkv at 25% stores less than full"
    skipped = rows[("kvsurgery", "nosuchpass")]
    assert skipped["status"] == "skipped" and "nosuchpass" in skipped["reason"]
    kvpress = next(r for r in data["rows"] if r["engine"] == "kvpress")
    assert kvpress["status"] == "skipped" and "--kvpress-python" in kvpress["reason"]
    printed = capsys.readouterr().out
    assert "| engine" in printed and "ms/tok" in printed and str(out) in printed


def test_attention_benchmark_is_skipped_without_cuda(tmp_path):
    out = tmp_path / "attention.json"
    argv = ["bench", "--attention", "--device", "cpu", "--shape", "tiny", "--contexts", "64", "--out", str(out)]
    assert cli.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "skipped" and "CUDA" in row["reason"]


def test_context_lists_accept_k_suffixes():
    assert _tokens("16K,64k, 300") == [16384, 65536, 300]


def test_attention_rows_for_each_quantization_layout_count_the_bytes_their_store_holds():
    """The attention benchmark's quantized rows on CPU (ops run their reference; timing stubbed): one row per recipe,
    and the bytes they report are the bytes of the store tensors the kernel reads (plus the key pass of the
    calibration pre-pass where the recipe squeezes logits)."""
    import torch

    from kvsurgery.bench.attention import QUANT_RECIPES, attention_group, quantized_store, recipe_layout, split_recipes
    from kvsurgery.kernels.quant_attention import bytes_read

    calls = []

    def one_call(fn):
        out = fn()
        assert out.shape == (1, 4, 1, 128) and torch.isfinite(out).all()
        calls.append(1)
        return 1.0

    tokens, n_kv, d = 300, 2, 128
    rows = attention_group(tokens, 1, n_kv, 4, d, torch.float32, 1e9, QUANT_RECIPES, torch.device("cpu"), one_call)
    assert [r["kernel"] for r in rows] == ["attend (float32)"] + [f"attend_quantized {q}" for q in QUANT_RECIPES]
    assert len(calls) == 2 + len(QUANT_RECIPES)  # dense kernel, SDPA, one per layout
    assert rows[0]["bytes_read"] == 2 * n_kv * tokens * d * 4 + n_kv * tokens * 4
    for recipe, row in zip(QUANT_RECIPES, rows[1:], strict=True):
        lay, squeeze = recipe_layout(recipe)
        store, packed, dense = quantized_store(lay, tokens, 1, n_kv, d, torch.float32, torch.device("cpu"))
        assert packed + dense == tokens and row["packed_tokens"] == packed > 0
        held = sum(t.nbytes for name, t in store.items() if name not in ("start", "length", "seen", "q_start", "q_len"))
        again = sum(store[n].nbytes for n in ("qk_codes", "qk_scale", "qk_low")) if squeeze > 0 else 0
        assert row["bytes_read"] == held + again == bytes_read(lay, packed, dense, n_kv, d, 1, 4, 4, squeeze)
        assert row["of_dense_bytes"] < 1
    assert split_recipes("kivi2(group=128,residual=256), quant1bit") == ("kivi2(group=128,residual=256)", "quant1bit")


def test_rounds_time_rows_side_by_side_and_ratios_are_per_round(tmp_path, capsys):
    """--rounds: every engine on its own copy of the model, each round times each once; a row's ratio to HF is the
    median of the per-round ratios of the rounds' median steps."""
    import statistics

    out = tmp_path / "bench.json"
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--contexts", "48", "--batch", "1", "--budget", "0.25",
            "--recipes", "full,snapkv(window=4)", "--new-tokens", "4", "--rounds", "3", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["rounds"] == 3
    rows = {(r["engine"], r["recipe"]): r for r in data["rows"] if r["engine"] != "kvpress"}
    hf = rows[("hf", "full (dynamic cache)")]
    static = rows[("hf", "full (static cache)")]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert len(row["rounds_ms"]) == 3 and all(ms > 0 for ms in row["rounds_ms"])
        assert row["decode_mean_ms"] > 0 and row["decode_ms"] > 0 and row["warmup_s"] > 0
        expected = statistics.median(h / x for h, x in zip(hf["rounds_ms"], row["rounds_ms"], strict=True))
        assert row["vs_hf_default"] == expected
        expected = statistics.median(s / x for s, x in zip(static["rounds_ms"], row["rounds_ms"], strict=True))
        assert row["vs_hf_static"] == expected
    assert hf["vs_hf_default"] == 1.0
    printed = capsys.readouterr().out
    assert printed.count("round ") == 3 and "round 3/3" in printed


def test_rounds_and_repeats_are_not_combined(capsys):
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--rounds", "2", "--repeats", "2"]
    assert cli.main(argv) == 2
    assert "--rounds" in capsys.readouterr().err
