"""`full` is token-identical to the untouched model on every supported family, batch 1 and left-padded batch 4."""

import pytest
import torch

import kvsurgery
from kvsurgery.testing import FAMILIES, greedy, left_padded_batch, tiny_model

CASES = [(family, "sdpa") for family in FAMILIES] + [("llama", "eager"), ("gemma3", "eager")]


@pytest.mark.parametrize(("family", "attn"), CASES)
def test_full_recipe_is_token_identical(family, attn):
    # sliding windows shorter than the prompt exercise the exact sliding-window store (Mistral, Gemma3)
    window = {"mistral": 12, "gemma3": 8}.get(family)
    model = tiny_model(family, attn=attn, layers=3, sliding_window=window)
    ids, mask = left_padded_batch([20, 17, 13, 9], seed=1)
    expected_batch = greedy(model, ids, mask, new=10)
    expected_single = greedy(model, ids[:1], new=10)

    kvsurgery.apply(model, "full")
    assert torch.equal(greedy(model, ids, mask, new=10), expected_batch)
    assert torch.equal(greedy(model, ids[:1], new=10), expected_single)
    sites = model._kvsurgery.sites
    assert [s.layer for s in sites] == [0, 1, 2]
    assert all(s.kind == attn for s in sites)
    if window:
        assert any(s.sliding_window == window for s in sites)
