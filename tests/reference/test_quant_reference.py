"""Properties of the quantized store ops (`kvsurgery.reference.quant`): the same kept tokens as the unquantized
store, packed round trips, attention against float64 over the dequantized tokens, KIVI residual bookkeeping."""

import dataclasses
from dataclasses import dataclass

import hypothesis.strategies as st
import torch
from hypothesis import given

from kvsurgery.reference import core as ref
from kvsurgery.reference import quant as qref
from kvsurgery.reference.quant_codes import QuantSpec, dequantize_tokens, quantize_tokens, squeeze_logits
from kvsurgery.reference.quant_layout import QuantLayout
from kvsurgery.store import LayerPlan, StoreLayer

D = 16
seeds = st.integers(0, 2**31 - 1)


@dataclass(frozen=True)
class Case:
    batch: int
    n_kv: int
    group: int  # query heads per KV head
    t: int
    pads: list[int]
    keep: list[int]
    sinks: int
    window: int
    room: int
    layout: QuantLayout
    seed: int


@st.composite
def layouts(draw) -> QuantLayout:
    bits = draw(st.sampled_from([1, 2, 4]))
    if draw(st.booleans()):  # KIVI: keys per channel over token groups, values per token, flushed residual
        group = draw(st.sampled_from([2, 4, 8]))
        residual = group * draw(st.integers(1, 3))
        return QuantLayout(QuantSpec(bits, "channel", group), QuantSpec(bits, "token", group), residual=residual)
    group = draw(st.sampled_from([0, 0, 4]))  # CalibQuant: per channel over the span (or token groups), recent window
    shrink = draw(st.sampled_from([1.0, 0.5]))
    spec = QuantSpec(bits, "channel", group, shrink=shrink)
    return QuantLayout(spec, dataclasses.replace(spec, shrink=shrink * 0.6), recent=draw(st.integers(0, 6)))


@st.composite
def cases(draw) -> Case:
    t = draw(st.integers(2, 30))
    n_kv = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 2))
    return Case(
        batch=batch,
        n_kv=n_kv,
        group=draw(st.sampled_from([1, 2])),
        t=t,
        pads=[draw(st.integers(0, t - 1)) for _ in range(batch)],
        keep=[draw(st.integers(1, t + 2)) for _ in range(n_kv)],
        sinks=draw(st.integers(0, 2)),
        window=draw(st.integers(0, 3)),
        room=draw(st.integers(1, 12)),
        layout=draw(layouts()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _mask(pads: list[int], t: int) -> torch.Tensor:
    valid = torch.arange(t)[None, :] >= torch.tensor(pads)[:, None]
    return (torch.ones(t, t, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]


def quant_layer(c: Case, keep=None, shared=False, dtype=torch.float64) -> StoreLayer:
    keep = list(keep or c.keep)
    packed, dense = c.layout.allocation(keep, c.room, shared)
    planes = tuple(c.layout.planes(c.n_kv, packed, D, D))
    plan = LayerPlan(0, tuple(keep), c.room, False, D, D, planes=planes, dense_slots=dense)
    return StoreLayer(plan, c.batch, dtype, torch.device("cpu"))


def _inputs(c: Case, dtype=torch.float64):
    g = torch.Generator().manual_seed(c.seed)
    k = torch.randn(c.batch, c.n_kv, c.t, D, generator=g).to(dtype)
    v = torch.randn(c.batch, c.n_kv, c.t, D, generator=g).to(dtype)
    scores = torch.rand(c.batch, c.n_kv, c.t, generator=g)
    return k, v, scores, _mask(c.pads, c.t)


def prefill(c: Case, layer: StoreLayer, k, v, scores, mask, budgets=None, quantize_first=None) -> None:
    args = (k, v, scores, budgets, mask, quantize_first, c.sinks, c.window, c.layout.text())
    qref.select_quantized_(layer.named(), *args)


def unquantized_kept(c: Case, k, v, scores, mask, keep=None) -> list[list[list[int]]]:
    plan = LayerPlan(0, tuple(keep or c.keep), 0, False, D, D)
    layer = StoreLayer(plan, c.batch, k.dtype, torch.device("cpu"))
    ref.select_compact_(layer.named(), k, v, scores, None, mask, c.sinks, c.window)
    return [[_segment(layer.pos, layer.start, layer.length, b, h) for h in range(c.n_kv)] for b in range(c.batch)]


def _segment(pos, start, length, b, h) -> list[int]:
    s, n = int(start[b, h]), int(length[b, h])
    return pos[b, s : s + n].tolist()


def packed_tokens(layer: StoreLayer, lay: QuantLayout, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dequantized packed keys and values of one (row, head), in float64."""
    p = layer.planes
    n = int(p["q_len"][b, h])
    k_hat = qref.read_packed(p["qk_codes"], p["qk_scale"], p["qk_low"], lay.k, p["q_start"], n, torch.float64)
    v_hat = qref.read_packed(p["qv_codes"], p["qv_scale"], p["qv_low"], lay.v, p["q_start"], n, torch.float64)
    return k_hat[b, h], v_hat[b, h]


def expected_dequantized(x: torch.Tensor, spec: QuantSpec, stat_dtype) -> torch.Tensor:
    """Tokens [N, D] quantized directly as one head's packed span (groups from its first token)."""
    n = x.shape[0]
    if n == 0:
        return x.new_zeros(0, x.shape[1], dtype=torch.float64)
    width = -(-n // spec.group) * spec.group if spec.axis == "channel" and spec.group else n
    padded = torch.cat([x, x.new_zeros(width - n, x.shape[1])])
    valid = torch.arange(width) < n
    codes, scale, low = quantize_tokens(padded, valid, spec, stat_dtype)
    return dequantize_tokens(codes, scale, low, spec, torch.float64)[:n]


@given(cases())
def test_prefill_keeps_the_unquantized_tokens_and_packs_the_oldest(c):
    """Kept set = the unquantized store's; the packed span round-trips through its codes; the dense region holds
    the rest in full precision (KIVI: the newest, at most `residual`; CalibQuant: the `recent` newest)."""
    k, v, scores, mask = _inputs(c)
    layer = quant_layer(c)
    prefill(c, layer, k, v, scores, mask)
    expected = unquantized_kept(c, k, v, scores, mask)
    lay, planes = c.layout, layer.planes
    for b in range(c.batch):
        for h in range(c.n_kv):
            kept = expected[b][h]
            n_packed = int(planes["q_len"][b, h])
            dense = _segment(layer.pos, layer.start, layer.length, b, h)
            assert n_packed + len(dense) == len(kept)
            assert dense == kept[n_packed:], "the dense region holds the newest kept tokens, in order"
            if lay.residual:
                assert len(dense) <= lay.residual and n_packed % lay.flush == 0
            else:
                assert len(dense) == min(lay.recent, len(kept))
            start = int(layer.start[b, h])
            assert torch.equal(layer.k[b, start : start + len(dense)], k[b, h, dense]), "dense tokens are exact"
            k_hat, v_hat = packed_tokens(layer, lay, b, h)
            old = kept[:n_packed]
            torch.testing.assert_close(k_hat, expected_dequantized(k[b, h, old], lay.k, torch.float64))
            torch.testing.assert_close(v_hat, expected_dequantized(v[b, h, old], lay.v, torch.float64))


@given(cases(), st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3))
def test_prefill_budgets_decided_at_run_time_fit_the_shared_allocation(c, weights):
    """Ada-KV style budgets (any split of the row total among heads) never overflow the planned regions."""
    k, v, scores, mask = _inputs(c)
    total = sum(c.keep)
    share = torch.tensor(weights[: c.n_kv]) + 1e-3
    split = ref.largest_remainder((share / share.sum() * total)[None], torch.tensor([float(total)]))[0]
    budgets = split.to(torch.int32).expand(c.batch, c.n_kv).contiguous()
    layer = quant_layer(c, shared=True)
    prefill(c, layer, k, v, scores, mask, budgets=budgets)
    assert torch.equal(layer.keep, budgets)
    expected = unquantized_kept(c, k, v, scores, mask, keep=split.tolist())
    for b in range(c.batch):
        for h in range(c.n_kv):
            n_packed = int(layer.planes["q_len"][b, h])
            assert n_packed + int(layer.length[b, h]) == len(expected[b][h])
    packed, dense = c.layout.allocation(c.keep, c.room, shared=True)
    assert int(layer.planes["q_cap"].sum(-1).max()) <= packed and int(layer.cap.sum(-1).max()) <= dense


@given(cases(), seeds, st.sampled_from([0.0, 2.0]))
def test_attention_equals_float64_attention_over_the_dequantized_tokens(c, seed, squeeze):
    """Decode attention over the store (after one append) = float64 softmax attention over the dequantized packed
    tokens and the exact dense ones, with the packed logits squeezed as CalibQuant does."""
    k, v, scores, mask = _inputs(c)
    layer = quant_layer(c)
    prefill(c, layer, k, v, scores, mask)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(c.batch, c.n_kv * c.group, 1, D, generator=g, dtype=torch.float64)
    k_new = torch.randn(c.batch, c.n_kv, 1, D, generator=g, dtype=torch.float64)
    v_new = torch.randn(c.batch, c.n_kv, 1, D, generator=g, dtype=torch.float64)
    qref.append_quantized_(layer.named(), k_new, v_new, c.layout.text())
    out = qref.attend_quantized(q, layer.named(), 0.3, c.layout.text(), squeeze)
    for b in range(c.batch):
        for h in range(c.n_kv):
            k_hat, v_hat = packed_tokens(layer, c.layout, b, h)
            s, n = int(layer.start[b, h]), int(layer.length[b, h])
            keys, values = torch.cat([k_hat, layer.k[b, s : s + n]]), torch.cat([v_hat, layer.v[b, s : s + n]])
            for j in range(c.group):
                logits = keys @ q[b, h * c.group + j, 0] * 0.3
                is_packed = torch.arange(len(keys)) < len(k_hat)
                logits = squeeze_logits(logits, is_packed, squeeze)
                expected = torch.softmax(logits, 0) @ values
                torch.testing.assert_close(out[b, h * c.group + j, 0], expected, rtol=1e-12, atol=1e-12)


@given(cases(), st.integers(1, 40))
def test_kivi_residual_flushes_whole_groups_and_never_exceeds_r(c, steps):
    """Over many decode steps: the residual stays <= R, a group of G leaves it exactly when it is full, packed
    groups are the oldest tokens quantized together, and the dense region is always the newest tokens, exact."""
    lay = QuantLayout(QuantSpec(2, "channel", 4), QuantSpec(2, "token", 4), residual=8)
    c = dataclasses.replace(c, layout=lay, room=steps)
    k, v, scores, mask = _inputs(c)
    layer = quant_layer(c)
    prefill(c, layer, k, v, scores, mask)
    history = [[list(kept) for kept in row] for row in unquantized_kept(c, k, v, scores, mask)]
    keys = [[k[b, h, kept] for h, kept in enumerate(row)] for b, row in enumerate(history)]
    g = torch.Generator().manual_seed(c.seed + 1)
    for step in range(steps):
        before = layer.length.clone()
        q_before = layer.planes["q_len"].clone()
        k_new = torch.randn(c.batch, c.n_kv, 1, D, generator=g, dtype=torch.float64)
        qref.append_quantized_(layer.named(), k_new, k_new, lay.text())
        flushed = layer.planes["q_len"] - q_before
        assert torch.equal(flushed, torch.where(before == 8, 4, 0).to(flushed.dtype)), "flush exactly when full"
        assert bool((layer.length <= 8).all()) and bool((layer.planes["q_len"] % 4 == 0).all())
        for b in range(c.batch):
            for h in range(c.n_kv):
                history[b][h].append(c.t + step)
                keys[b][h] = torch.cat([keys[b][h], k_new[b, h]])
    for b in range(c.batch):
        for h in range(c.n_kv):
            n_packed = int(layer.planes["q_len"][b, h])
            dense = _segment(layer.pos, layer.start, layer.length, b, h)
            assert dense == history[b][h][n_packed:]
            start = int(layer.start[b, h])
            assert torch.equal(layer.k[b, start : start + len(dense)], keys[b][h][n_packed:])
            k_hat, _ = packed_tokens(layer, lay, b, h)
            torch.testing.assert_close(k_hat, expected_dequantized(keys[b][h][:n_packed], lay.k, torch.float64))


def test_calibquant_gives_the_full_precision_slots_to_text_tokens_first():
    """With a modality mask, the `recent` dense slots take the newest text tokens; every visual token is packed."""
    spec = QuantSpec(1, "channel", 0, shrink=0.5)
    c = Case(1, 1, 1, 12, [0], [12], 0, 0, 2, QuantLayout(spec, spec, recent=3), 0)
    k, v, scores, mask = _inputs(c)
    visual = torch.zeros(1, 12, dtype=torch.bool)
    visual[0, 2:8] = True  # [text 0-1 | image 2-7 | text 8-11]
    layer = quant_layer(c)
    prefill(c, layer, k, v, scores, mask, quantize_first=visual)
    assert _segment(layer.pos, layer.start, layer.length, 0, 0) == [9, 10, 11]
    k_hat, _ = packed_tokens(layer, c.layout, 0, 0)
    torch.testing.assert_close(k_hat, expected_dequantized(k[0, 0, [0, 1, 2, 3, 4, 5, 6, 7, 8]], spec, torch.float64))
    visual[0, 2:] = True  # fewer text tokens than dense slots: the newest visual tokens fill the rest
    layer = quant_layer(c)
    prefill(c, layer, k, v, scores, mask, quantize_first=visual)
    assert _segment(layer.pos, layer.start, layer.length, 0, 0) == [0, 1, 11]
