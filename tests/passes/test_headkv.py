"""HeadKV / HeadKV-R2: the budget formula, per-KV-head aggregation, the needle criteria, calibration determinism,
the calibration artefact's checks, and generation on a tiny model."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import kvsurgery
from kvsurgery.calibration import headkv as cal
from kvsurgery.calibration.artefact import Artefact, ModelIdentity, save
from kvsurgery.calibration.haystack import Case
from kvsurgery.errors import CalibrationError
from kvsurgery.manager import build_recipe
from kvsurgery.reference.headkv import head_caps, kv_head_importance, redistribute_overflow
from kvsurgery.sites import AttentionSite
from kvsurgery.testing import greedy, left_padded_batch, tiny_model

# -- the budget formula ------------------------------------------------------------------------------------------


@st.composite
def importance(draw):
    n_layers, n_kv, group = draw(st.integers(1, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.rand(n_layers, n_kv * group, generator=g, dtype=torch.float64)
    scores[torch.rand(scores.shape, generator=g) < draw(st.floats(0.0, 0.9))] = 0.0  # many heads never retrieve
    scores.view(-1)[0] += 0.01
    return kv_head_importance(scores, n_kv)


@given(importance(), st.integers(0, 2000), st.floats(1.0, 20.0), st.floats(1.0, 20.0))
def test_caps_sum_to_the_budget_keep_min_num_and_larger_beta_is_more_uniform(shares, base, beta1, beta2):
    lo, hi = sorted((beta1, beta2))
    n_heads = shares.numel()
    caps_lo = [c for row in head_caps(shares, base, lo) for c in row]
    caps_hi = [c for row in head_caps(shares, base, hi) for c in row]
    for beta, caps in ((lo, caps_lo), (hi, caps_hi)):
        assert abs(sum(caps) - n_heads * base) <= n_heads / 2 + 1e-6  # the average head keeps `base`
        assert min(caps) >= base - base // beta  # min_num is guaranteed to every head
    # a larger beta shrinks the shared pool: the least important head gets more, the most important less
    assert min(caps_hi) >= min(caps_lo) - 1 and max(caps_hi) <= max(caps_lo) + 1
    assert max(caps_hi) - min(caps_hi) <= max(caps_lo) - min(caps_lo) + 1


@given(importance(), st.integers(0, 500), st.floats(1.0, 5.0), st.integers(1, 600))
def test_redistributed_caps_keep_the_total_stay_under_the_limit_and_never_shrink(shares, base, beta, limit):
    caps = head_caps(shares, base, beta)
    out = redistribute_overflow(caps, limit, shares)
    flat_in, flat_out = [c for row in caps for c in row], [c for row in out for c in row]
    assert len(out) == len(caps) and all(len(a) == len(b) for a, b in zip(out, caps, strict=True))
    assert sum(flat_out) == min(sum(flat_in), limit * len(flat_in))  # nothing of the budget is lost
    assert all(min(c, limit) <= o <= limit for c, o in zip(flat_in, flat_out, strict=True))
    if max(flat_in) <= limit:
        assert out == caps  # no overflow: the faithful caps


def test_formula_worked_values():
    uniform = torch.full((2, 4), 1 / 8, dtype=torch.float64)
    assert head_caps(uniform, 120, 1.01) == [[120] * 4] * 2  # min_num 2 + pool share 118
    one_hot = torch.zeros(2, 4, dtype=torch.float64)
    one_hot[1, 2] = 1.0
    caps = head_caps(one_hot, 120, 1.01)
    assert caps[1][2] == 118 * 8 + 2 and {c for row in caps for c in row} - {caps[1][2]} == {2}
    assert head_caps(one_hot, 120, 1.0)[0] == [0, 0, 0, 0]  # beta 1: everything is pooled
    assert set(head_caps(one_hot, 120, 200.0)[0]) == {120}  # beta > base: no pool, uniform


def test_query_head_scores_are_normalised_then_summed_per_kv_head():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)  # query heads 0,1 read KV head 0
    torch.testing.assert_close(kv_head_importance(scores, 2), torch.tensor([[0.3, 0.7]], dtype=torch.float64))
    squared = kv_head_importance(scores, 2, temp=2.0)
    torch.testing.assert_close(squared, torch.tensor([[5 / 30, 25 / 30]], dtype=torch.float64))
    torch.testing.assert_close(kv_head_importance(scores, 4), scores / 10)
    with pytest.raises(CalibrationError, match="all zero"):
        kv_head_importance(torch.zeros(2, 4), 2)


def _sites(n_layers: int) -> list[AttentionSite]:
    return [AttentionSite(i, f"layers.{i}.attn", "sdpa", 4, 2, 16, 16, 0.25, None) for i in range(n_layers)]


def _plan(shares: torch.Tensor, budget: int, prompt_len: int, text: str = "headkv") -> list[list[int]]:
    recipe = build_recipe(text, budget=budget, calibration="unused.json")
    recipe.states[recipe.passes[1].name] = shares  # what check_model returns from the calibration
    return [list(p.keep) for p in recipe.plan(_sites(len(shares)), [prompt_len], 8)]


def test_plan_keeps_caps_plus_window_and_truncates_faithfully():
    shares = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    keeps = _plan(shares, 40, 200)  # base 32, min_num 1, pool 31 * 4
    assert keeps == [[round(s * 124 + 1) + 8 for s in row] for row in shares.tolist()]
    assert abs(sum(map(sum, keeps)) - 4 * 40) <= 2
    heavy = torch.tensor([[0.01, 0.01], [0.01, 0.97]], dtype=torch.float64)
    keeps = _plan(heavy, 40, 60)  # the heavy head's cap (121) exceeds the 52 selectable tokens: it keeps all 60
    assert keeps[1][1] == 60 and sum(map(sum, keeps)) < 4 * 40  # the repo's truncation: the total falls short
    assert _plan(heavy, 40, 39) == [[39, 39], [39, 39]]  # base 32 > 31 selectable: no compression at all


def test_redistribute_gives_a_truncated_heads_excess_to_the_others():
    heavy = torch.tensor([[0.01, 0.01], [0.01, 0.97]], dtype=torch.float64)
    keeps = _plan(heavy, 40, 60, "headkv(redistribute=true)")
    assert keeps[1][1] == 60 and abs(sum(map(sum, keeps)) - 4 * 40) <= 2  # the excess went to the other heads
    assert min(map(min, keeps)) > min(map(min, _plan(heavy, 40, 60)))


# -- the needle criteria -----------------------------------------------------------------------------------------


def _case() -> Case:
    ids = (5, 6, 7, 8, 9, 10, 11, 12)
    return Case(ids, span_start=2, span_end=6, answer_ids=(7, 8, 9, 10), answer_text=None, length=8, depth=0.0)


def test_retrieval_step_counts_top1_copies_inside_the_span():
    probs = torch.zeros(3, 9)
    probs[0, 3] = 1.0  # top-1 in the span on token 8
    probs[1, 3] = 1.0
    probs[2, 7] = 1.0  # top-1 outside the span
    torch.testing.assert_close(cal.retrieval_step(probs, _case(), token=8), torch.tensor([0.25, 0.25, 0.0]).double())
    assert cal.retrieval_step(probs, _case(), token=9).sum() == 0  # attended token is not the one generated


def test_reasoning_step_sums_span_attention_among_the_top_n():
    probs = torch.tensor([[0.0, 0.1, 0.3, 0.2, 0.0, 0.0, 0.25, 0.15, 0.0]])  # top-4: 2, 6, 3, 7
    torch.testing.assert_close(cal.reasoning_step(probs, _case()), torch.tensor([(0.3 + 0.2) / 4]).double())


def test_answers_are_judged_by_rouge_recall_and_token_f1():
    case = _case()
    assert cal.answered("retrieval", [7, 8, 9, 99], case, None)  # 3 of 4 needle tokens
    assert not cal.answered("retrieval", [7, 8], case, None)
    assert cal.token_f1("mary likes tea".split(), "mary likes tea".split()) == 1.0
    assert cal.rouge1_recall(["a", "a"], ["a", "b"]) == 0.5


# -- calibration and the pass on a tiny model ------------------------------------------------------------------

TINY = cal.Settings(criterion="reasoning", needles=1, lengths=(40, 64), depths=(0, 100), max_new=3, average_over="all")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2, heads=4, kv_heads=2, seed=0)


def test_calibration_is_deterministic_and_shows_progress(model, tmp_path, capsys):
    first = save(cal.calibrate_model(model, None, TINY), tmp_path / "a.json")
    assert "headkv reasoning needles" in capsys.readouterr().err
    second = save(cal.calibrate_model(model, None, TINY, progress=False), tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()
    art = kvsurgery.calibration.load(first, "headkv", model)
    scores = torch.tensor(art.data["scores"])
    assert scores.shape == (2, 4) and (scores >= 0).all() and scores.sum() > 0
    assert art.data["cases"] == 4 and art.params["criterion"] == "reasoning"
    other = cal.calibrate_model(model, None, cal.Settings(**{**TINY.__dict__, "seed": 1}), progress=False)
    assert other.data["scores"] != art.data["scores"]
    with pytest.raises(CalibrationError, match="answered none of the 4 retrieval"):
        cal.calibrate_model(model, None, cal.Settings(needles=1, lengths=(40, 64), depths=(0, 100), max_new=2))


def test_calibrate_command(model, tmp_path, monkeypatch, capsys):
    from kvsurgery import cli, models

    monkeypatch.setattr(models, "load_model", lambda name, attn="sdpa": (model, None))
    out = tmp_path / "s.json"
    argv = ["calibrate", "headkv", "--model", "tiny", "--out", str(out), "--criterion", "reasoning"]
    assert cli.main([*argv, "--needles", "1", "--lengths", "40", "--depths", "50", "--average-over", "all"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert kvsurgery.calibration.load(out, "headkv", model).params["depths"] == [50.0]


def _artefact(model, path, scores, criterion="retrieval"):
    return save(Artefact("headkv", ModelIdentity.of(model), {}, {"criterion": criterion, "scores": scores}), path)


SCORES = [[0.5, 0.1, 0.0, 0.2], [0.05, 0.0, 0.9, 0.3]]


def test_errors_say_how_to_fix(model, tmp_path):
    with pytest.raises(CalibrationError, match=r"kvsurgery calibrate headkv --model \S+ --out headkv\.json"):
        kvsurgery.apply(model, "headkv", budget=32)
    with pytest.raises(CalibrationError, match=r"--out headkv-r2\.json --criterion reasoning"):
        kvsurgery.apply(model, "headkv-r2", budget=32)
    path = _artefact(model, tmp_path / "r.json", SCORES)
    with pytest.raises(CalibrationError, match=r"holds retrieval head scores.*use recipe 'headkv'"):
        kvsurgery.apply(model, "headkv-r2", budget=32, calibration=str(path))
    with pytest.raises(CalibrationError, match=r"made for another model.*fingerprint"):
        kvsurgery.apply(tiny_model("llama", layers=2, heads=4, kv_heads=2, seed=1), "headkv", 32, calibration=str(path))
    zeros = _artefact(model, tmp_path / "z.json", [[0.0] * 4] * 2)
    with pytest.raises(CalibrationError, match="all zero"):
        kvsurgery.apply(model, "headkv", budget=32, calibration=str(zeros))
    with pytest.raises(kvsurgery.RecipeError, match="beta must be >= 1"):
        kvsurgery.apply(model, "headkv", budget=32, calibration=str(path), beta=0.5)
    assert "_kvsurgery" not in model.__dict__


def test_generate_uses_per_head_budgets_and_a_budget_over_the_prompt_is_exact(model, tmp_path):
    path = _artefact(model, tmp_path / "r.json", SCORES)
    ids, mask = left_padded_batch([64, 50], seed=2)
    expected = greedy(model, ids, mask)
    kvsurgery.apply(model, "headkv", budget=24, calibration=str(path))
    try:
        greedy(model, ids, mask)
        shares = kv_head_importance(torch.tensor(SCORES, dtype=torch.float64), 2)
        caps = head_caps(shares, 16, 1.01)
        for layer in model._kvsurgery.last_store.layers:
            want = [c + 8 for c in caps[layer.plan.layer]]
            assert layer.keep.tolist() == [want, want]
            assert layer.length.tolist() == [[k + 7 for k in want]] * 2  # + 7 decoded tokens (8th is not cached)
        assert sum(sum(c) + 16 for c in caps) == 4 * 24
        text = str(kvsurgery.explain(model))
        assert "headkv" in text and "kvsurgery.score_window" in text
    finally:
        kvsurgery.restore(model)
    kvsurgery.apply(model, "headkv", budget=80, calibration=str(path))  # base 72 > 56 selectable: keeps all
    try:
        assert torch.equal(greedy(model, ids, mask), expected)
    finally:
        kvsurgery.restore(model)


def test_headkv_composes_with_1bit_storage(model, tmp_path):
    """headkv+quant1bit: the same per-KV-head budgets, the oldest kept tokens of each head stored in 1 bit."""
    path = _artefact(model, tmp_path / "r.json", SCORES)
    ids, mask = left_padded_batch([64, 50], seed=2)
    kvsurgery.apply(model, "headkv+quant1bit(recent=4)", budget=24, calibration=str(path))
    try:
        greedy(model, ids, mask)
        caps = head_caps(kv_head_importance(torch.tensor(SCORES, dtype=torch.float64), 2), 16, 1.01)
        for layer in model._kvsurgery.last_store.layers:
            want = [c + 8 for c in caps[layer.plan.layer]]
            assert layer.keep.tolist() == [want, want]
            assert layer.planes["q_len"].tolist() == [[k - 4 for k in want]] * 2, "all but the 4 newest packed"
        assert "quant1bit: kvsurgery.select_quantized_" in str(kvsurgery.explain(model))
    finally:
        kvsurgery.restore(model)
