"""Ada-KV's budget reference: per-head shares that keep the layer's total and every head's floor."""

import hypothesis.strategies as st
import torch
from hypothesis import given

from kvsurgery.reference import adakv as ref


@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(8, 40),
    st.integers(0, 2),
    st.integers(0, 4),
    st.integers(0, 2**31 - 1),
)
def test_adakv_budgets_keep_the_layer_total_and_the_floor(batch, n_kv, t, sinks, window, seed):
    g = torch.Generator().manual_seed(seed)
    budget = max(sinks + window + 1, t // 2)
    scores = torch.rand(batch, n_kv, t, generator=g)
    keep = torch.full((batch, n_kv), budget, dtype=torch.int32)
    out = ref.adakv_budgets(scores, None, keep, sinks, window, 0.2, True)
    assert out.dtype == torch.int32 and out.shape == (batch, n_kv)
    assert (out.sum(-1) == n_kv * budget).all(), "the layer's total budget is preserved exactly"
    floor = int(0.2 * (budget - sinks - window))
    assert (out >= floor + sinks + window).all(), "every head keeps at least its floor"
