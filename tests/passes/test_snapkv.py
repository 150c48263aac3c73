"""`snapkv` (Li et al., 2024; docs/design.md, "Passes"): what it keeps, checked against the model's own attention
probabilities (transformers' eager attention), its option errors, and where it rewrites."""

import pytest
import torch
import torch.nn.functional as F

import kvsurgery
from kvsurgery.testing import tiny_model

T, WINDOW, KERNEL, SINKS, BUDGET = 32, 4, 3, 2, 12


def expected_kept(ids: torch.Tensor) -> list[list[set[int]]]:
    """Per layer and KV head: the sinks, the window and the top prefix tokens by pooled window attention, from the
    eager model's attention probabilities (mean over the window's queries and each KV head's query group)."""
    model = tiny_model("llama", attn="eager")
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions  # per layer [1, Hq, T, T]
    n_kv = model.config.num_key_value_heads
    kept = []
    for p in probs:
        scores = p[0, :, T - WINDOW :].mean(1).reshape(n_kv, -1, T).mean(1)  # [Hkv, T]
        prefix = F.avg_pool1d(scores[:, None, : T - WINDOW], KERNEL, 1, KERNEL // 2, count_include_pad=True)[:, 0]
        prefix[:, :SINKS] = float("inf")  # sinks are always kept
        top = prefix.topk(BUDGET - WINDOW, dim=-1).indices
        kept.append([set(row.tolist()) | set(range(T - WINDOW, T)) for row in top])
    return kept


def test_snapkv_keeps_the_window_the_sinks_and_the_top_pooled_window_attention():
    ids = torch.randint(3, 100, (1, T), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama")
    kvsurgery.apply(model, f"snapkv(window={WINDOW},kernel={KERNEL},sinks={SINKS})", budget=BUDGET)
    model.generate(ids, max_new_tokens=1, do_sample=False)
    store = model._kvsurgery.last_store
    for layer, heads in zip(store.layers, expected_kept(ids), strict=True):
        assert layer.keep.tolist() == [[BUDGET] * len(heads)]
        for h, expected in enumerate(heads):
            start = int(layer.start[0, h])
            assert set(layer.pos[0, start : start + BUDGET].tolist()) == expected, f"KV head {h}"
    kvsurgery.restore(model)


def test_snapkv_scores_at_prefill_only():
    model = tiny_model("llama")
    kvsurgery.apply(model, "snapkv(window=4)", budget=8)
    model.generate(torch.randint(3, 100, (1, 16)), max_new_tokens=2, do_sample=False)
    text = str(kvsurgery.explain(model))
    prefill, decode = text.split("decode graph:")
    assert "snapkv: kvsurgery.score_window" in prefill
    assert "score_window" not in decode and "snapkv" not in decode.split("cache:")[0]
    kvsurgery.restore(model)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("snapkv(kernel=4)", "odd kernel"),
        ("snapkv(window=0)", "window >= 1"),
        ("snapkv(pool=median)", "pool must be 'avg' or 'max'"),
    ],
)
def test_snapkv_refuses_bad_options(recipe, message):
    with pytest.raises(kvsurgery.RecipeError, match=message):
        kvsurgery.apply(tiny_model("llama"), recipe, budget=8)
