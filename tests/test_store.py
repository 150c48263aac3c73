"""The store really frees memory: allocated bytes equal the recipe's budget arithmetic."""

import pytest
import torch

import kvsurgery
from kvsurgery.testing import greedy, left_padded_batch, tiny_model

PROMPT, NEW, BATCH, BUDGET = 40, 4, 2, 12


def expected_kv_bytes(plans, batch: int, item: int) -> int:
    """Budget arithmetic: (sum over KV heads of kept tokens + decode room per head) x K/V bytes per token."""
    return sum(batch * (sum(p.keep) + len(p.keep) * p.room) * (p.head_dim + p.v_head_dim) * item for p in plans)


@pytest.mark.parametrize("recipe", ["full", "snapkv(window=4)", "pyramidkv", "adakv", "h2o(window=4)", "streaming"])
def test_allocated_bytes_match_the_budget_arithmetic(recipe):
    model = tiny_model("llama", layers=3, heads=4, kv_heads=2, head_dim=64)
    ids, mask = left_padded_batch([PROMPT, PROMPT - 7], seed=3)
    kvsurgery.apply(model, recipe, budget=None if recipe == "full" else BUDGET)
    greedy(model, ids, mask, new=NEW)
    store = model._kvsurgery.last_store
    plans = [layer.plan for layer in store.layers]
    expected = expected_kv_bytes(plans, BATCH, item=4)
    assert abs(store.nbytes - expected) <= 0.05 * expected, (store.nbytes, expected)

    full_tokens = PROMPT + NEW
    if recipe == "full":
        assert all(p.keep == (PROMPT, PROMPT) and p.room == NEW for p in plans)
    elif recipe in ("h2o(window=4)", "streaming"):
        assert all(p.keep == (BUDGET, BUDGET) and p.room == 0 for p in plans)  # decode evicts: fixed capacity
    else:
        kept_per_head = [k for p in plans for k in p.keep]
        assert sum(kept_per_head) / len(kept_per_head) == pytest.approx(BUDGET, abs=1.0)
        assert store.nbytes < 0.5 * expected_kv_bytes(plans, BATCH, 4) * full_tokens / (BUDGET + NEW)


def test_adakv_budgets_differ_per_head_but_not_in_total():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=64, seed=5)
    ids, mask = left_padded_batch([PROMPT, PROMPT], seed=5)
    kvsurgery.apply(model, "adakv", budget=BUDGET)
    greedy(model, ids, mask, new=NEW)
    store = model._kvsurgery.last_store
    for layer in store.layers:
        assert (layer.keep.sum(-1) == 2 * BUDGET).all()
        assert bool((layer.cap == layer.keep + NEW).all())
    assert any(int(layer.keep.max()) != int(layer.keep.min()) for layer in store.layers)


def test_pyramid_budgets_shrink_with_depth():
    model = tiny_model("llama", layers=4, heads=4, kv_heads=2, head_dim=16)
    ids, _ = left_padded_batch([200], seed=0)
    kvsurgery.apply(model, "pyramidkv", budget=40)
    greedy(model, ids, new=2)
    keeps = [layer.plan.keep[0] for layer in model._kvsurgery.last_store.layers]
    assert keeps == sorted(keeps, reverse=True) and keeps[0] > keeps[-1]
    assert sum(keeps) / len(keeps) == pytest.approx(40, abs=1.5)


def test_decode_eviction_keeps_the_cache_at_fixed_capacity():
    model = tiny_model("llama", layers=2)
    ids, _ = left_padded_batch([30], seed=2)
    kvsurgery.apply(model, "streaming", budget=10)
    greedy(model, ids, new=25)
    store = model._kvsurgery.last_store
    assert all(int(layer.length.max()) == 10 for layer in store.layers)
    assert int(store.layers[0].seen) == 30 + 24  # the last generated token is never fed back
    kept = sorted(store.layers[0].pos[0, :10].tolist())
    assert kept == [0, 1, 2, 3, 48, 49, 50, 51, 52, 53]  # 4 sinks + the 6 most recent tokens
    assert store.layers[0].k.dtype == torch.float32


def test_decode_window_gives_any_scorer_a_fixed_capacity():
    model = tiny_model("llama", layers=2)
    ids, _ = left_padded_batch([30], seed=2)
    kvsurgery.apply(model, "snapkv(window=4)+decode_window(window=6)", budget=12)
    greedy(model, ids, new=25)
    layer = model._kvsurgery.last_store.layers[0]
    assert layer.plan.room == 0 and layer.plan.keep == (12, 12)
    for h in range(2):
        start = int(layer.start[0, h])
        kept = sorted(layer.pos[0, start : start + 12].tolist())
        decoded = [p for p in kept if p >= 30]
        # the 6 tokens cached before the newest one are protected, plus the newest: 7 recent tokens
        assert decoded == list(range(47, 54)), "only the most recent decoded tokens stay"
        assert len([p for p in kept if p < 30]) == 5, "the best-scored prompt tokens fill the rest"
