"""Properties of the reference ops (the specification): selection, compaction, decode attention, eviction."""

import dataclasses
from dataclasses import dataclass

import hypothesis.strategies as st
import torch
from hypothesis import given

from kvsurgery.reference import core as ref
from kvsurgery.store import LayerPlan, StoreLayer


@dataclass(frozen=True)
class Case:
    batch: int
    n_kv: int
    group: int  # query heads per KV head
    t: int  # prompt length (padding included)
    d: int
    pads: list[int]  # left padding per row
    keep: list[int]  # budget per KV head
    sinks: int
    window: int
    room: int
    seed: int


@st.composite
def layer_case(draw) -> Case:
    """A random prefill: batch rows with left padding, GQA heads, per-head budgets, sinks and window."""
    t = draw(st.integers(2, 24))
    n_kv = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 3))
    return Case(
        batch=batch,
        n_kv=n_kv,
        group=draw(st.sampled_from([1, 2, 3])),
        t=t,
        d=draw(st.sampled_from([4, 8])),
        pads=[draw(st.integers(0, t - 1)) for _ in range(batch)],
        keep=[draw(st.integers(1, t + 3)) for _ in range(n_kv)],
        sinks=draw(st.integers(0, 3)),
        window=draw(st.integers(0, 4)),
        room=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _padding_mask(pads: list[int], t: int) -> torch.Tensor:
    """The model's causal+padding mask [B, 1, T, T] (bool) for left-padded rows."""
    valid = torch.arange(t)[None, :] >= torch.tensor(pads)[:, None]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return (causal[None] & valid[:, None, :])[:, None]


def _prefill(c: Case, dtype=torch.float64):
    g = torch.Generator().manual_seed(c.seed)
    k = torch.randn(c.batch, c.n_kv, c.t, c.d, generator=g, dtype=dtype)
    v = torch.randn(c.batch, c.n_kv, c.t, c.d, generator=g, dtype=dtype)
    scores = torch.rand(c.batch, c.n_kv, c.t, generator=g)
    plan = LayerPlan(0, tuple(c.keep), c.room, False, c.d, c.d)
    layer = StoreLayer(plan, c.batch, dtype, torch.device("cpu"))
    mask = _padding_mask(c.pads, c.t)
    ref.select_compact_(layer.named(), k, v, scores, None, mask, c.sinks, c.window)
    return layer, k, v, scores, mask


def _kept(layer: StoreLayer, b: int, h: int) -> list[int]:
    start, n = int(layer.start[b, h]), int(layer.length[b, h])
    return layer.pos[b, start : start + n].tolist()


@given(layer_case())
def test_selection_keeps_sinks_window_and_exactly_the_top_scores(c):
    layer, k, _, scores, _ = _prefill(c)
    for b in range(c.batch):
        valid = list(range(c.pads[b], c.t))
        for h in range(c.n_kv):
            kept = _kept(layer, b, h)
            assert kept == sorted(kept), "kept tokens are stored in position order"
            assert len(kept) == min(c.keep[h], len(valid)), "never more than the budget, never fewer than it allows"
            assert set(kept) <= set(valid), "padding is never kept"
            forced = set(valid[: c.sinks]) | set(valid[max(0, len(valid) - c.window) :])
            if c.keep[h] >= len(forced):
                assert forced <= set(kept), "sinks and the recent window are always kept"
                rest = [p for p in valid if p not in forced]
                chosen = [p for p in kept if p not in forced]
                dropped = [p for p in rest if p not in kept]
                if chosen and dropped:
                    assert min(scores[b, h, chosen]) >= max(scores[b, h, dropped]), "the others are the top-k"
            start = int(layer.start[b, h])
            stored = layer.k[b, start : start + len(kept)]
            assert torch.equal(stored, k[b, h, kept]), "stored keys are the kept tokens' keys"


@given(layer_case())
def test_segments_do_not_overlap_and_fill_the_store(c):
    layer, *_ = _prefill(c)
    plan = layer.plan
    assert layer.k.shape[1] == plan.slots
    for b in range(c.batch):
        ends = (layer.start[b] + layer.cap[b]).tolist()
        assert layer.start[b].tolist() == [0, *ends[:-1]]
        assert ends[-1] == plan.slots
        assert bool((layer.length[b] <= layer.cap[b]).all())


@given(layer_case(), st.integers(0, 2**31 - 1))
def test_decode_attention_equals_dense_attention_on_the_kept_tokens(c, seed):
    """Append one token, attend over the store: equals float64 dense attention restricted to kept + new tokens."""
    c = dataclasses.replace(c, room=max(c.room, 1))  # room for the appended token
    layer, k, v, _, _ = _prefill(c)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(c.batch, c.n_kv * c.group, 1, c.d, generator=g, dtype=torch.float64)
    k_new = torch.randn(c.batch, c.n_kv, 1, c.d, generator=g, dtype=torch.float64)
    v_new = torch.randn(c.batch, c.n_kv, 1, c.d, generator=g, dtype=torch.float64)
    allowed = torch.zeros(c.batch, c.n_kv, 1, c.t + 1, dtype=torch.bool)
    for b in range(c.batch):
        for h in range(c.n_kv):
            allowed[b, h, 0, [*_kept(layer, b, h), c.t]] = True
    ref.append_(layer.named(), k_new, v_new, 0, 0, False, False, "position")
    out = ref.attend(q, layer.named(), 0.3, 0)
    expected = ref.dense_attention(q, torch.cat([k, k_new], 2), torch.cat([v, v_new], 2), allowed, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@given(layer_case(), st.integers(1, 12))
def test_eviction_keeps_capacity_sinks_and_evicts_oldest_first(c, steps):
    """Decoding with eviction never exceeds capacity, keeps the sinks and the newest token, evicts the oldest."""
    c = dataclasses.replace(c, room=0)  # evicting stores have no decode room
    layer, *_ = _prefill(c)
    entered = [[_kept(layer, b, h) for h in range(c.n_kv)] for b in range(c.batch)]
    g = torch.Generator().manual_seed(c.seed)
    for step in range(steps):
        k_new = torch.randn(c.batch, c.n_kv, 1, c.d, generator=g, dtype=torch.float64)
        ref.append_(layer.named(), k_new, k_new, c.sinks, 0, True, False, "position")
        for row in entered:
            for tokens in row:
                tokens.append(c.t + step)
    for b in range(c.batch):
        for h in range(c.n_kv):
            kept = _kept(layer, b, h)
            seen = entered[b][h]  # every token that ever entered this segment, in order
            assert len(kept) == len(set(kept)) == min(c.keep[h], len(seen)), "capacity is never exceeded"
            assert seen[-1] in kept, "the newest token is always stored"
            if c.sinks < c.keep[h]:
                sinks = seen[: c.sinks]
                assert set(sinks) <= set(kept), "the first `sinks` tokens survive eviction"
                others = [p for p in seen if p not in sinks]
                n_others = len(kept) - len(sinks)
                assert sorted(set(kept) - set(sinks)) == others[len(others) - n_others :], "oldest evicted first"


@given(st.lists(st.floats(0, 50), min_size=1, max_size=8), st.integers(0, 2**31 - 1))
def test_largest_remainder_rounds_to_the_exact_total(values, seed):
    target = torch.tensor([values])
    total = torch.tensor([float(round(sum(values)))])
    out = ref.largest_remainder(target, total)
    assert int(out.sum()) == int(total)
    assert ((out - target).abs() < 1.0 + 1e-6).all()
