"""PrefixKV: the binary search of the global prefix configuration, the anchor-eviction decode op against a list
oracle of the reference code, the layer-level scores, calibration, and end-to-end generation on a tiny model."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import kvsurgery
from kvsurgery.calibration import prefixkv as cal
from kvsurgery.calibration.artefact import save
from kvsurgery.errors import BudgetError, CalibrationError
from kvsurgery.reference import prefixkv as pref
from kvsurgery.reference.prefixkv_budget import decode_room, prefix_keep
from kvsurgery.store import LayerPlan, StoreLayer
from kvsurgery.testing import left_padded_batch, tiny_model

# -- the global prefix configuration ----------------------------------------------------------------------------


@st.composite
def layer_scores(draw):
    n_layers = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        t = draw(st.integers(16, 200))
        sharp = draw(st.floats(0.2, 6.0))  # how concentrated the layer's attention is
        out.append(torch.rand(t, generator=g, dtype=torch.float64) ** sharp + 1e-6)
    return out


@given(layer_scores(), st.floats(0.0, 0.9), st.floats(0.0, 0.9))
def test_search_meets_the_target_and_is_monotone(scores, e1, e2):
    lo, hi = sorted((e1, e2))
    cdfs = cal.layer_cdfs(scores)
    lengths = [len(s) for s in scores]
    protect = 2
    reachable = sum(n - 1 - protect for n in lengths)
    r_lo, p_lo = cal.search_ratios(cdfs, lo, protect)
    r_hi, p_hi = cal.search_ratios(cdfs, hi, protect)
    for ratios, evict in ((r_lo, lo), (r_hi, hi)):
        assert all(0.0 <= r <= 1.0 for r in ratios)
        drops = [r * n for r, n in zip(ratios, lengths, strict=True)]
        assert all(abs(d - round(d)) < 1e-9 for d in drops)  # whole tokens per layer
        target = evict * sum(lengths)
        if target <= reachable - cal.TOLERANCE:
            # the search lands within the tolerance, the rescale then truncates each layer to an int
            assert target - len(lengths) - 1e-9 <= sum(drops) <= target + 1e-9
    if hi * sum(lengths) - lo * sum(lengths) >= 2 * cal.TOLERANCE:
        assert p_hi <= p_lo  # evicting more lowers the cumulative importance every layer keeps
        d_lo = [r * n for r, n in zip(r_lo, lengths, strict=True)]
        d_hi = [r * n for r, n in zip(r_hi, lengths, strict=True)]
        assert sum(d_hi) >= sum(d_lo)
        total = max(sum(d_lo), 1.0)
        for a, b in zip(d_lo, d_hi, strict=True):  # per layer up to the rescale of a 5-token tolerance
            assert b >= a - 1 - math.ceil(a * 2 * cal.TOLERANCE / total)


def test_search_gives_concentrated_layers_fewer_tokens():
    """Every layer keeps the same cumulative importance: a layer whose attention sits on few tokens keeps few."""
    t = 100
    diffuse = torch.ones(t, dtype=torch.float64)
    peaked = torch.full((t,), 1e-3, dtype=torch.float64)
    peaked[:5] = 10.0
    ratios, _ = cal.search_ratios(cal.layer_cdfs([diffuse, peaked]), 0.5, 2)
    assert ratios[1] >= 0.85 and ratios[0] <= 0.15
    assert abs(sum(ratios) / 2 - 0.5) <= 1 / t


# -- the decode op against the reference code's list semantics ---------------------------------------------------


def _oracle_step(cache: list[int], new_pos: int, n: int, ratio: float, anchor: int) -> None:
    """The reference code's cache as a list: append, then delete cache[anchor] when int(len - n * (1 - ratio)) > 0
    (n = the row's tokens so far)."""
    cache.append(new_pos)
    if int(len(cache) - n * (1 - ratio)) > 0:
        del cache[min(anchor, len(cache) - 1)]


@given(
    t=st.integers(32, 120),
    ratio=st.floats(0.0, 0.9),
    steps=st.integers(1, 80),
    distance=st.sampled_from([-25, -3, 0]),
    pads=st.lists(st.integers(0, 6), min_size=1, max_size=2),
    n_kv=st.integers(1, 2),
)
def test_anchor_eviction_matches_the_list_oracle_and_keeps_one_minus_ratio(t, ratio, steps, distance, pads, n_kv):
    batch = len(pads)
    rows_t = [t - p for p in pads]
    keeps = [prefix_keep(n, ratio, 2) for n in rows_t]
    room = decode_room(steps, ratio)
    plan = LayerPlan(0, (max(keeps),) * n_kv, room, True, 4, 4, row_keep=tuple((k,) * n_kv for k in keeps))
    layer = StoreLayer(plan, batch, torch.float64, torch.device("cpu"))
    oracles = []
    for b in range(batch):  # prefill: the sink, the last token and a spread of the rest, in position order
        kept = sorted({pads[b], t - 1, *range(pads[b] + 1, t - 1)[: keeps[b] - 2]})
        oracles.append(list(kept))
        for h in range(n_kv):
            s = int(layer.start[b, h])
            layer.pos[b, s : s + len(kept)] = torch.tensor(kept, dtype=torch.int32)
            layer.k[b, s : s + len(kept)] = torch.tensor(kept, dtype=torch.float64)[:, None]
            layer.length[b, h] = len(kept)
    layer.seen.fill_(t)
    anchors = pref.anchor_index(layer.keep, distance)
    for _ in range(steps):
        n_seen = int(layer.seen)
        k_new = torch.full((batch, n_kv, 1, 4), float(n_seen), dtype=torch.float64)
        pref.append_anchor_(layer.named(), k_new, k_new.clone(), ratio, distance)
        for b in range(batch):
            n = n_seen + 1 - pads[b]
            cache = oracles[b]
            _oracle_step(cache, n_seen, n, ratio, int(anchors[b, 0]))
            for h in range(n_kv):
                s, length = int(layer.start[b, h]), int(layer.length[b, h])
                filled = layer.pos[b, s : s + length].tolist()
                assert sorted(filled) == cache  # the same tokens as the reference code's cache
                assert layer.k[b, s : s + length, 0].tolist() == filled  # keys moved with their positions
                assert (layer.pos[b, s + length : s + int(layer.cap[b, h])] == -1).all()  # contiguous segment
                assert length <= int(layer.cap[b, h])
                assert abs(length - n * (1 - ratio)) <= 1.5  # retention stays at 1 - ratio
                assert pads[b] in filled  # the sink
                assert n_seen in filled or distance >= 0  # the anchor sits before the newest token


# -- scores, calibration, the pass ------------------------------------------------------------------------------


def test_layer_scores_are_head_averaged_accumulated_attention_shared_by_kv_heads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 10, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64)
    scores = pref.layer_scores(q, k, None, 8**-0.5)
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 8**-0.5
    probs = logits.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    expected = probs.mean(dim=1).sum(dim=1)  # the calibration's definition: mean over heads, sum over queries
    assert scores.shape == (2, 3, 10)
    for h in range(3):
        torch.testing.assert_close(scores[:, h].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=3, heads=4, kv_heads=2, seed=0)


@pytest.fixture(scope="module")
def calibration(model, tmp_path_factory):
    art = cal.calibrate_model(model, None, budgets=[0.3, 0.5], lengths=[48, 64], samples=2, progress=False)
    return save(art, tmp_path_factory.mktemp("prefixkv") / "prefixkv.json")


def test_calibration_is_deterministic_shows_progress_and_meets_the_budget(model, calibration, capsys):
    again = cal.calibrate_model(model, None, budgets=[0.3, 0.5], lengths=[48, 64], samples=2, progress=True)
    path = save(again, calibration.with_name("again.json"))
    assert path.read_bytes() == calibration.read_bytes()
    assert "prefixkv calibration prompts" in capsys.readouterr().err
    for budget, ratios in again.data["ratios"].items():
        assert len(ratios) == 3 and all(0 <= r <= 1 for r in ratios)
        # each prompt's drops sum to the target up to int truncation (<= 1 token per layer of a >= 48-token prompt)
        assert 1 - float(budget) - 1 / 48 <= sum(ratios) / 3 <= 1 - float(budget) + 1e-9
    assert model.config._attn_implementation == "sdpa"  # calibration switched to eager and back


def test_calibrate_command(model, tmp_path, monkeypatch, capsys):
    from kvsurgery import cli, models

    monkeypatch.setattr(models, "load_model", lambda name, attn="sdpa": (model, None))
    out = tmp_path / "p.json"
    argv = ["calibrate", "prefixkv", "--model", "tiny", "--out", str(out), "--lengths", "40", "--samples", "1"]
    assert cli.main([*argv, "--budgets", "0.5"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert kvsurgery.calibration.load(out, "prefixkv", model).params["lengths"] == [40]


def test_errors_say_how_to_fix(model, calibration):
    ids = torch.randint(3, 128, (1, 40))
    with pytest.raises(CalibrationError, match=r"kvsurgery calibrate prefixkv --model .* --out prefixkv\.json"):
        kvsurgery.apply(model, "prefixkv", budget=0.5)
    with pytest.raises(BudgetError, match="retained fraction of the prompt"):
        kvsurgery.apply(model, "prefixkv", budget=32, calibration=str(calibration))
    with pytest.raises(CalibrationError, match=r"budgets 0.3, 0.5, not 0.2; .* --budgets 0.2"):
        kvsurgery.apply(model, "prefixkv", budget=0.2, calibration=str(calibration))
    with pytest.raises(CalibrationError, match=r"sinks=1, the recipe uses sinks=4; use prefixkv\(sinks=1\)"):
        kvsurgery.apply(model, "prefixkv(sinks=4)", budget=0.5, calibration=str(calibration))
    with pytest.raises(CalibrationError, match="made for another model"):
        kvsurgery.apply(
            tiny_model("llama", layers=3, heads=4, kv_heads=2, seed=1), "prefixkv", 0.5, calibration=str(calibration)
        )
    assert "_kvsurgery" not in model.__dict__ and ids.shape == (1, 40)


def test_generate_keeps_calibrated_layer_budgets_and_shared_tokens(model, calibration):
    ratios = kvsurgery.calibration.load(calibration, "prefixkv").data["ratios"]["0.5"]
    prompt = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(3))
    importance = cal.layer_importance(model, prompt)  # the calibration's own definition, from eager probabilities
    kvsurgery.apply(model, "prefixkv", budget=0.5, calibration=str(calibration))
    try:
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=1, do_sample=False)
        for layer, ratio in zip(model._kvsurgery.last_store.layers, ratios, strict=True):
            keep = 60 - round(ratio * 60)
            assert layer.keep.tolist() == [[keep, keep]]
            kept = [sorted(layer.pos[0, s : s + keep].tolist()) for s in layer.start[0].tolist()]
            assert kept[0] == kept[1]  # layer-level indices: every KV head keeps the same tokens
            middle = importance[layer.plan.layer][1:59]
            top = (middle.argsort(descending=True, stable=True)[: keep - 2] + 1).tolist()
            assert kept[0] == sorted([0, 59, *top])  # the sink, the last prompt token, the best by importance

        ids, mask = left_padded_batch([70, 52], seed=1)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40, do_sample=False)
        assert "kvsurgery.prefixkv_append_" in str(kvsurgery.explain(model))
        for layer, ratio in zip(model._kvsurgery.last_store.layers, ratios, strict=True):
            for row, n_prompt in enumerate((70, 52)):
                n = n_prompt + 39  # the 40th token is sampled, never appended
                assert (layer.length[row] - n * (1 - ratio)).abs().max() <= 1.5
                assert int(layer.pos[row].max()) == 70 + 38  # the newest token is cached
    finally:
        kvsurgery.restore(model)
