"""CSP and VLM support: n-softmax, self/cross scores and budgets, deduplicated selection, tiny LLaVA / Qwen2-VL."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import kvsurgery
from kvsurgery.errors import UnsupportedModelError
from kvsurgery.pass_base import Pass, SiteRewrite
from kvsurgery.reference import core as ref
from kvsurgery.reference import csp as cm
from kvsurgery.store import LayerPlan, StoreLayer
from kvsurgery.testing import IMAGE_TOKEN, image_prompt, tiny_model, tiny_vlm


# -- n-softmax --------------------------------------------------------------------------------------------------
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(0, 3), st.floats(0.1, 20.0))
def test_n_softmax_is_softmax_with_n_extra_zero_logits(seed, width, n, spread):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(5, width, generator=g, dtype=torch.float64) * 2 - 1) * spread
    x[0, : width // 2] = float("-inf")  # partly masked row
    x[1] = float("-inf")  # fully masked row
    out = cm.n_softmax(x, n)
    e = x.exp()
    expected = e / (n + e.sum(-1, keepdim=True)) if n else torch.softmax(x, -1).nan_to_num(0.0)
    assert torch.allclose(out, expected, atol=1e-12, rtol=1e-10)
    if n:
        assert bool((out[2:].sum(-1) < 1).all()), "finite rows give away mass to the n zero logits"
        assert torch.equal(out[1], torch.zeros(width)), "a fully masked row attends to nothing"
    else:
        assert torch.allclose(out[2:].sum(-1), torch.ones(3, dtype=torch.float64))


# -- scores and selection -----------------------------------------------------------------------------------------
@st.composite
def prompt_case(draw):
    t = draw(st.integers(3, 20))
    batch = draw(st.integers(1, 2))
    return dict(
        batch=batch,
        n_kv=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 3])),
        t=t,
        pads=[draw(st.integers(0, t - 2)) for _ in range(batch)],
        window=draw(st.integers(1, 5)),
        n=draw(st.integers(0, 2)),
        keep=draw(st.integers(1, t + 2)),
        cross_ratio=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    b, n_kv, t, d = c["batch"], c["n_kv"], c["t"], 4
    q = torch.randn(b, n_kv * c["group"], t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, n_kv, t, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, n_kv, t, d, generator=g, dtype=torch.float64)
    is_visual = torch.rand(b, t, generator=g) < 0.5
    valid = torch.arange(t)[None, :] >= torch.tensor(c["pads"])[:, None]
    mask = (torch.ones(t, t, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]
    return q, k, v, is_visual, mask, valid


@given(prompt_case())
def test_self_and_cross_scores_split_the_window_attention_by_modality(c):
    q, k, _, vis, mask, _ = _inputs(c)
    scale = 0.5
    s_self, s_cross = cm.csp_scores(q, k, mask, vis, scale, c["window"], c["n"])
    t, g = c["t"], c["group"]
    w = min(c["window"], t)
    for b in range(c["batch"]):
        for h in range(c["n_kv"]):
            want_self, want_cross = torch.zeros(t, dtype=torch.float64), torch.zeros(t, dtype=torch.float64)
            for head in range(h * g, (h + 1) * g):
                for i in range(t - w, t):
                    logits = (k[b, h] @ q[b, head, i]) * scale
                    logits[~mask[b, 0, i]] = float("-inf")
                    probs = cm.n_softmax(logits, c["n"])
                    same = vis[b] == vis[b, i]
                    want_self += torch.where(same, probs, 0.0) / g
                    want_cross += torch.where(same, 0.0, probs) / g
            assert torch.allclose(s_self[b, h].double(), want_self, atol=1e-6)
            assert torch.allclose(s_cross[b, h].double(), want_cross, atol=1e-6)


@given(prompt_case())
def test_selection_has_no_duplicates_and_respects_the_self_and_cross_budgets(c):
    q, k, v, vis, mask, valid = _inputs(c)
    s_self, s_cross = cm.csp_scores(q, k, mask, vis, 0.5, c["window"], c["n"])
    forced = ref.forced_keep(valid, 0, c["window"])
    candidate = valid & ~forced
    n_select = (c["keep"] - forced.sum(-1, keepdim=True)).clamp_min(0).expand(-1, c["n_kv"])
    self_pick, cross_pick = cm.csp_select(s_self, s_cross, candidate, n_select, c["cross_ratio"])
    k_cross = torch.floor(n_select.double() * c["cross_ratio"]).long()
    k_self = n_select - k_cross
    assert not bool((self_pick & cross_pick).any()), "no token is picked twice"
    assert bool((self_pick.sum(-1) <= k_self).all()) and bool((cross_pick.sum(-1) <= k_cross).all())
    picked = self_pick | cross_pick
    assert not bool((picked & ~candidate[:, None]).any()), "padding and the window are never picks"
    for b in range(c["batch"]):
        for h in range(c["n_kv"]):
            pos_self = candidate[b] & (s_self[b, h] > 0)
            assert int(self_pick[b, h].sum()) == min(int(k_self[b, h]), int(pos_self.sum()))
            if self_pick[b, h].any() and (pos_self & ~self_pick[b, h]).any():
                assert s_self[b, h][self_pick[b, h]].min() >= s_self[b, h][pos_self & ~self_pick[b, h]].max()
            pos_cross = candidate[b] & (s_cross[b, h] > 0) & ~self_pick[b, h]
            assert int(cross_pick[b, h].sum()) == min(int(k_cross[b, h]), int(pos_cross.sum()))

    # the op's priorities make select_compact_ keep the window, every pick, then backfill by total score
    plan = LayerPlan(0, (c["keep"],) * c["n_kv"], 0, False, 4, 4)
    layer = StoreLayer(plan, c["batch"], torch.float64, torch.device("cpu"))
    keep = layer.keep
    prio = cm.csp_priority(q, k, mask, vis, keep, 0.5, c["window"], c["cross_ratio"], c["n"])
    ref.select_compact_(layer.named(), k, v, prio, None, mask, 0, c["window"])
    for b in range(c["batch"]):
        for h in range(c["n_kv"]):
            start, n = int(layer.start[b, h]), int(layer.length[b, h])
            kept = layer.pos[b, start : start + n].tolist()
            assert len(kept) == len(set(kept)) == min(c["keep"], int(valid[b].sum())), "budget filled, no duplicates"
            window = forced[b].nonzero().flatten().tolist()
            if c["keep"] >= len(window):
                assert set(window) <= set(kept), "the recent window is always kept"
                assert set(picked[b, h].nonzero().flatten().tolist()) <= set(kept), "every pick is kept"


# -- VLMs ---------------------------------------------------------------------------------------------------------
def _generate(model, inputs, new=4):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_full_is_token_identical_to_the_untouched_vlm_with_an_image(kind):
    model = tiny_vlm(kind)
    inputs = image_prompt(model)
    expected = _generate(model, inputs)
    kvsurgery.apply(model, "full")
    assert torch.equal(_generate(model, inputs), expected)
    text = str(kvsurgery.explain(model))
    assert "layers 0-1 model.language_model.layers.{i}.self_attn: sdpa, 4 q heads / 2 kv heads" in text
    kvsurgery.restore(model)


def test_vision_tower_attention_inside_the_captured_graph_is_left_alone():
    """A direct forward() with pixels captures the CLIP tower too: its attention reads no KV cache."""
    model = tiny_vlm("llava")
    inputs = image_prompt(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    kvsurgery.apply(model, "full")
    with torch.no_grad():
        logits = model(**inputs).logits
    report = model._kvsurgery.reports["prefill"]
    assert report.before["conv2d"] == 1, "the vision tower is in the graph"
    assert report.before["scaled_dot_product_attention"] == 3 == report.after["scaled_dot_product_attention"]
    assert torch.equal(logits, expected)
    kvsurgery.restore(model)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_csp_end_to_end_keeps_window_self_and_cross_tokens(kind):
    model = tiny_vlm(kind)
    inputs = image_prompt(model)
    ids = inputs["input_ids"][0]
    budget, window = 16, 4
    kvsurgery.apply(model, "csp", budget=budget, window=window)
    out = _generate(model, inputs)
    assert out.shape == (1, 4)
    text = str(kvsurgery.explain(model))
    assert "csp: is_visual(input_ids), kvsurgery.score_csp; select: kvsurgery.select_compact_" in text
    t = ids.shape[0]
    for layer in model._kvsurgery.last_store.layers:
        assert layer.keep.tolist() == [[budget, budget]]
        for h in range(2):
            start = int(layer.start[0, h])
            kept = layer.pos[0, start : start + budget].tolist()
            assert len(set(kept)) == budget and set(range(t - window, t)) <= set(kept)
            picks = [p for p in kept if p < t - window]
            visual = [p for p in picks if ids[p] == IMAGE_TOKEN]
            assert len(visual) == (budget - window) // 2, "text-window queries: cross picks are the visual tokens"
    kvsurgery.restore(model)


class VisualFirstTest(Pass):
    """Test budget pass: uses csp's is_visual product to rank every visual token above everything else."""

    name = "visual_first_test"
    phase = "budget"
    provides = frozenset({"budget"})
    requires = frozenset({"scores"})
    products = frozenset({"scores"})
    needs_budget = True

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase == "prefill":
            boost = rw.call(self.name, torch.mul, (rw.products["is_visual"], 10.0))
            boost = rw.call(self.name, torch.unsqueeze, (boost, 1))
            rw.products["scores"] = rw.call(self.name, torch.add, (rw.products["scores"], boost))


def test_is_visual_product_marks_exactly_the_image_tokens():
    kvsurgery.register_pass(VisualFirstTest)
    model = tiny_vlm("llava")
    inputs = image_prompt(model)
    ids = inputs["input_ids"][0]
    visual = (ids == IMAGE_TOKEN).nonzero().flatten().tolist()
    window = 2
    kvsurgery.apply(model, "csp+visual_first_test", budget=len(visual) + window, window=window)
    _generate(model, inputs, new=2)
    for layer in model._kvsurgery.last_store.layers:
        kept = sorted(layer.pos[0, : len(visual) + window].tolist())
        assert kept == [*visual, ids.shape[0] - 2, ids.shape[0] - 1]
    kvsurgery.restore(model)


def test_csp_on_a_text_only_model_names_the_missing_image_token_id():
    model = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match=r"'csp'.*LlamaForCausalLM's config has no image_token_id"):
        kvsurgery.apply(model, "csp", budget=64)
    assert "_kvsurgery" not in model.__dict__
