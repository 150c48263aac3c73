"""With a budget that covers everything cached, every eviction recipe equals `full` (hypothesis over shapes)."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import kvsurgery
from kvsurgery.testing import greedy, left_padded_batch, tiny_model

PREFILL_ONLY = ["snapkv(window=4)", "pyramidkv", "adakv"]
DECODE_EVICTING = ["h2o(window=4)", "streaming"]
NEW_TOKENS = 6


@st.composite
def shapes(draw):
    kv_heads = draw(st.integers(1, 2))
    return dict(
        family=draw(st.sampled_from(["llama", "qwen3"])),
        layers=draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        heads=kv_heads * draw(st.sampled_from([1, 2, 3])),
        head_dim=draw(st.sampled_from([8, 16])),
        lengths=draw(st.lists(st.integers(9, 18), min_size=1, max_size=2)),
        seed=draw(st.integers(0, 1000)),
        slack=draw(st.integers(0, 5)),
    )


@pytest.mark.parametrize("recipe", PREFILL_ONLY + DECODE_EVICTING)
@settings(max_examples=3)
@given(shape=shapes())
def test_budget_covering_the_cache_equals_full(recipe, shape):
    model = tiny_model(
        shape["family"],
        layers=shape["layers"],
        heads=shape["heads"],
        kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        seed=shape["seed"],
    )
    ids, mask = left_padded_batch(shape["lengths"], seed=shape["seed"])
    expected = greedy(model, ids, mask, new=NEW_TOKENS)
    # prefill-only recipes must keep the whole prompt; decode-evicting ones everything generated too
    covered = ids.shape[1] + (NEW_TOKENS if recipe in DECODE_EVICTING else 0)
    kvsurgery.apply(model, recipe, budget=covered + shape["slack"])
    try:
        assert torch.equal(greedy(model, ids, mask, new=NEW_TOKENS), expected)
    finally:
        kvsurgery.restore(model)
