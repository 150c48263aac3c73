"""Double Sparsity: labels, top-k selection, exact attention on the selection, calibration, the pass end to end."""

import json
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import kvsurgery
from kvsurgery.calibration.corpus import calibration_blocks
from kvsurgery.calibration.doublesparse import (
    calibrate_model,
    channel_order,
    load_channels,
    qk_statistic,
    save_channels,
)
from kvsurgery.errors import CalibrationError, RecipeError
from kvsurgery.reference import core as ref
from kvsurgery.reference import doublesparse as sa
from kvsurgery.store import LayerPlan, Plane, StoreLayer
from kvsurgery.testing import greedy, left_padded_batch, tiny_model


@dataclass(frozen=True)
class Case:
    batch: int
    n_kv: int
    group: int
    t: int  # prompt length (left padding included)
    d: int
    r: int
    bits: int
    pads: list[int]
    room: int
    seed: int


@st.composite
def store_case(draw) -> Case:
    t = draw(st.integers(2, 20))
    batch = draw(st.integers(1, 2))
    bits = draw(st.sampled_from([2, 4, 8, 16]))
    d = draw(st.sampled_from([8, 16]))
    return Case(
        batch=batch,
        n_kv=draw(st.integers(1, 3)),
        group=draw(st.sampled_from([1, 2, 3])),
        t=t,
        d=d,
        r=draw(st.sampled_from([4, 8])),
        bits=bits,
        pads=[draw(st.integers(0, t - 1)) for _ in range(batch)],
        room=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _store(c: Case, dtype=torch.float64):
    """A Double Sparsity layer store after prefill (every valid token kept, labels written) and its inputs."""
    g = torch.Generator().manual_seed(c.seed)
    k = torch.randn(c.batch, c.n_kv, c.t, c.d, generator=g, dtype=dtype)
    v = torch.randn(c.batch, c.n_kv, c.t, c.d, generator=g, dtype=dtype)
    hq = c.n_kv * c.group
    channels = torch.stack([torch.randperm(c.d, generator=g)[: c.r] for _ in range(hq)])
    label_dtype = torch.bfloat16 if c.bits == 16 else torch.uint8
    planes = [Plane("labels", (c.group, sa.label_width(c.r, c.bits)), label_dtype)]
    if c.bits < 16:
        planes.append(Plane("label_range", (c.group, 2), torch.float16))
    plan = LayerPlan(0, (c.t,) * c.n_kv, c.room, False, c.d, c.d, planes=tuple(planes))
    layer = StoreLayer(plan, c.batch, dtype, torch.device("cpu"))
    valid = torch.arange(c.t)[None, :] >= torch.tensor(c.pads)[:, None]
    mask = (torch.ones(c.t, c.t, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]
    ref.select_compact_(layer.named(), k, v, None, None, mask, 0, 0)
    sa.label_fill_(layer.named(), channels, c.bits)
    return layer, channels, g


def _labels_of(layer: StoreLayer, bits: int, b: int, slot: int) -> torch.Tensor:
    rng = layer.planes["label_range"][b, slot] if bits < 16 else None
    return sa.dequantize_labels(layer.planes["labels"][b, slot], rng, bits)


def _expected_label(key: torch.Tensor, channels: torch.Tensor, h: int, group: int, bits: int) -> torch.Tensor:
    raw = key[channels[h * group : (h + 1) * group]]  # [G, r]
    stored, rng = sa.quantize_labels(raw, bits)
    return sa.dequantize_labels(stored, rng, bits)


@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 4, 8]), st.integers(1, 6), st.floats(0.01, 100.0))
def test_label_quantization_error_is_within_half_a_step(seed, bits, n, spread):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 3, 8, generator=g, dtype=torch.float64) * spread).float()
    stored, rng = sa.quantize_labels(x, bits)
    assert stored.dtype == torch.uint8 and stored.shape == (n, 3, 8 * bits // 8)
    back = sa.dequantize_labels(stored, rng, bits)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)
    # half a step, plus the float16 rounding of the stored (min, step) pair
    bound = 0.5 * step * (1 + 2**-9) * 2**bits / (2**bits - 1) + 2**-10 * x.abs().amax(-1, keepdim=True)
    assert bool(((back - x).abs() <= bound + 1e-6).all())
    exact, none = sa.quantize_labels(x, 16)
    assert none is None and torch.equal(sa.dequantize_labels(exact, None, 16), x.bfloat16().float())


@given(store_case())
def test_prefill_fill_and_decode_append_write_each_tokens_label(c):
    layer, channels, g = _store(c)
    for b in range(c.batch):
        for h in range(c.n_kv):
            start, n = int(layer.start[b, h]), int(layer.length[b, h])
            assert n == c.t - c.pads[b], "every valid prompt token is kept"
            for slot in range(start, start + n):
                expected = _expected_label(layer.k[b, slot], channels, h, c.group, c.bits)
                assert torch.equal(_labels_of(layer, c.bits, b, slot), expected)
    before = layer.planes["labels"].clone()
    k_new = torch.randn(c.batch, c.n_kv, 1, c.d, generator=g, dtype=torch.float64)
    ref.append_(layer.named(), k_new, k_new, 0, 0, False, False, "position")
    sa.label_append_(layer.named(), k_new, channels, c.bits)
    changed = (layer.planes["labels"] != before).flatten(2).any(-1)
    for b in range(c.batch):
        for h in range(c.n_kv):
            slot = int(layer.start[b, h] + layer.length[b, h] - 1)
            assert int(layer.pos[b, slot]) == c.t, "append_ wrote the new token there"
            expected = _expected_label(k_new[b, h, 0], channels, h, c.group, c.bits)
            assert torch.equal(_labels_of(layer, c.bits, b, slot), expected)
            others = [s for s in range(layer.k.shape[1]) if s != slot and bool(changed[b, s])]
            assert not [s for s in others if int(layer.start[b, h]) <= s < int(layer.start[b, h] + layer.cap[b, h])]


def _brute_force_scores(q, layer, channels, c: Case, scale: float) -> dict:
    """{(b, h): {slot: approximate attention mass}} computed token by token in float64."""
    out = {}
    seen = int(layer.seen)
    for b in range(c.batch):
        for h in range(c.n_kv):
            start, n = int(layer.start[b, h]), int(layer.length[b, h])
            slots = list(range(start, start + n))
            mass = {s: 0.0 for s in slots}
            for gi in range(c.group):
                head = h * c.group + gi
                qc = q[b, head, 0, channels[head]].double()
                logits = torch.tensor([float(qc @ _labels_of(layer, c.bits, b, s)[gi].double()) for s in slots]) * scale
                for s, p in zip(slots, torch.softmax(logits, 0).tolist(), strict=True):
                    mass[s] += p
            for s in slots:
                if int(layer.pos[b, s]) == seen - 1:
                    mass[s] = float("inf")
            out[b, h] = mass
    return out


@given(store_case(), st.integers(1, 12))
def test_topk_selection_is_the_exact_topk_of_the_approximate_scores(c, k):
    layer, channels, g = _store(c)
    k_new = torch.randn(c.batch, c.n_kv, 1, c.d, generator=g, dtype=torch.float64)
    ref.append_(layer.named(), k_new, k_new, 0, 0, False, False, "position")
    sa.label_append_(layer.named(), k_new, channels, c.bits)
    q = torch.randn(c.batch, c.n_kv * c.group, 1, c.d, generator=g, dtype=torch.float64)
    scale = c.d**-0.5
    score, slots, valid = sa.approximate_scores(q, layer.named(), channels, scale, c.bits)
    chosen, ok = sa.select_tokens(score, slots, valid, torch.full((c.batch,), k))
    brute = _brute_force_scores(q, layer, channels, c, scale)
    for (b, h), mass in brute.items():
        picked = chosen[b, h][ok[b, h]].tolist()
        assert len(picked) == len(set(picked)) == min(k, len(mass)), "k distinct tokens (or all there are)"
        assert picked == sorted(picked), "gathered in slot order"
        current = [s for s, m in mass.items() if m == float("inf")]
        assert set(current) <= set(picked), "the current token is always attended"
        rest = [s for s in mass if s not in picked]
        if rest:
            finite = [mass[s] for s in picked if s not in current]
            assert not finite or min(finite) >= max(mass[s] for s in rest) - 1e-9, "the others are the top-k"
        brute_scores = torch.tensor(list(mass.values()), dtype=torch.float64)
        assert torch.allclose(score[b, h, : len(mass)].double(), brute_scores, atol=1e-9)


@given(store_case(), st.integers(0, 2**31 - 1))
def test_attention_on_the_selection_equals_float64_dense_attention_restricted_to_it(c, seed):
    layer, channels, _ = _store(c)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(c.batch, c.n_kv * c.group, 1, c.d, generator=g, dtype=torch.float64)
    width = int(layer.length.max())
    slots, rows = ref.segment_slots(layer.start, width, layer.k.shape[1])
    valid = torch.arange(width) < layer.length.long()[..., None]
    ok = valid & (torch.rand(valid.shape, generator=g) < 0.6)
    out = sa.attend_selected(q, layer.k, layer.v, slots, ok, 0.3)
    keys, values = layer.k[rows, slots], layer.v[rows, slots]
    dense = ref.dense_attention(q, keys, values, ok[:, :, None], 0.3)
    assert torch.allclose(out, dense, atol=1e-12, rtol=0)
    everything = sa.sparse_attend(q, layer.named(), channels, 0.3, c.t + 1, 0.0, c.bits)
    dense_store = ref.attend(q, layer.named(), 0.3, 0)
    assert torch.allclose(everything, dense_store, atol=1e-12, rtol=0), "k >= cached tokens is dense attention"


# -- calibration ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=4, heads=4, kv_heads=2, head_dim=16, seed=3)


@pytest.fixture(scope="module")
def channels_json(model, tmp_path_factory):
    artefact = calibrate_model(model, None, blocks=2, block_len=24, seed=0, progress=False)
    return save_channels(artefact, tmp_path_factory.mktemp("ds") / "channels.json")


def test_calibration_is_deterministic_accumulates_every_block_and_is_bound_to_the_model(model, channels_json, tmp_path):
    again = calibrate_model(model, None, blocks=2, block_len=24, seed=0, progress=False)
    assert save_channels(again, tmp_path / "again.json").read_bytes() == channels_json.read_bytes()
    saved = save_channels(again, tmp_path / "c.safetensors")
    assert torch.equal(load_channels(saved, model), load_channels(channels_json, model))
    header = json.loads(channels_json.read_text())
    assert header["params"]["statistic"] == "qk" and header["model"]["n_layers"] == 4

    # the statistic is the mean over *all* blocks (the reference kept only the last block's)
    blocks = calibration_blocks(None, 128, 2, 24, seed=0)
    first, second = (qk_statistic(model, blocks[i : i + 1], progress=False) for i in range(2))
    both = qk_statistic(model, blocks, progress=False)
    assert torch.allclose(both, (first + second) / 2, rtol=1e-12, atol=0) and not torch.allclose(both, second)
    assert torch.equal(again.tensors["channels"].long(), channel_order(both))

    other = tiny_model("llama", layers=4, heads=4, kv_heads=2, head_dim=16, seed=4)
    with pytest.raises(CalibrationError, match=r"made for another model.*fingerprint"):
        kvsurgery.apply(other, "doublesparse", budget=8, calibration=str(channels_json))
    assert "_kvsurgery" not in other.__dict__


def test_errors_name_the_problem_and_the_fix(model, channels_json):
    with pytest.raises(CalibrationError, match="kvsurgery calibrate doublesparse --model"):
        kvsurgery.apply(model, "doublesparse", budget=8)
    with pytest.raises(RecipeError, match="does not combine with 'snapkv"):
        kvsurgery.apply(model, "snapkv+doublesparse", budget=64, calibration=str(channels_json))
    with pytest.raises(RecipeError, match="r \\* label_bits a multiple of 8"):
        kvsurgery.apply(model, "doublesparse", budget=8, calibration=str(channels_json), r=3)
    with pytest.raises(RecipeError, match="label_bits must be one of"):
        kvsurgery.apply(model, "doublesparse", budget=8, calibration=str(channels_json), label_bits=3)
    assert "_kvsurgery" not in model.__dict__


def test_k_above_the_cached_tokens_equals_full_and_the_store_keeps_every_token(model, channels_json):
    ids, mask = left_padded_batch([28, 21], seed=5)
    new = 5
    expected = greedy(model, ids, mask, new=new)
    kvsurgery.apply(model, "doublesparse", budget=64, calibration=str(channels_json))
    try:
        assert torch.equal(greedy(model, ids, mask, new=new), expected)
        text = str(kvsurgery.explain(model))
        assert "layers 0-1: select: kvsurgery.append_; doublesparse: kvsurgery.attend" in text
        sparse = "doublesparse: kvsurgery.label_append_, kvsurgery.sparse_attend"
        assert f"layers 2-3: select: kvsurgery.append_; {sparse}" in text
        assert "layers 2-3: select: kvsurgery.select_compact_; doublesparse: kvsurgery.label_fill_" in text
        store = model._kvsurgery.last_store
        r = 16 // 4
        channels = load_channels(channels_json, model)
        for layer in store.layers:
            assert layer.length.tolist() == [[28 + new - 1] * 2, [21 + new - 1] * 2], "nothing is evicted"
            if layer.plan.layer < 2:
                assert not layer.planes, "dense layers carry no labels"
                continue
            assert layer.planes["labels"].shape[-2:] == (2, r * 4 // 8)
            for b in range(2):
                for h in range(2):
                    start = int(layer.start[b, h])
                    for slot in range(start, start + int(layer.length[b, h])):
                        key = layer.k[b, slot]
                        expected_label = _expected_label(key, channels[layer.plan.layer][:, :r], h, 2, 4)
                        assert torch.equal(_labels_of(layer, 4, b, slot), expected_label), (b, h, slot)
    finally:
        kvsurgery.restore(model)


@pytest.mark.real_model
@pytest.mark.slow
def test_real_smollm2_calibration_cli_and_a_passkey_at_small_k(smollm2, tmp_path):
    """SmolLM2-135M: a short calibration through the CLI, then a ~780-token passkey attending to 32 tokens/step."""
    import random

    from test_real_model import passkey_prompt

    from kvsurgery.cli import main

    model, tokenizer = smollm2
    out = tmp_path / "smollm2.json"
    assert main(["calibrate", "doublesparse", "--model", "smollm2-135m", "--out", str(out), "--blocks", "2"]) == 0
    channels = load_channels(out, model)
    assert channels.shape == (30, 9, 64)
    assert all(sorted(row.tolist()) == list(range(64)) for row in channels.reshape(-1, 64)), "permutations"

    key = random.Random(0).randint(10000, 99999)
    prompt = tokenizer(passkey_prompt(key, repeats=30, depth=0.3), return_tensors="pt").input_ids
    kvsurgery.apply(model, "doublesparse", budget=32, calibration=str(out))
    try:
        answer = tokenizer.decode(model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1] :])
        assert str(key) in answer, answer
        store = model._kvsurgery.last_store
        assert int(store.layers[5].length[0, 0]) == prompt.shape[1] + 7, "every token stays cached"
        assert "kvsurgery.sparse_attend': 28" in str(kvsurgery.explain(model)), "28 sparse layers, 2 dense"
    finally:
        kvsurgery.restore(model)


def test_a_fractional_k_follows_each_rows_own_prompt_length():
    keep = torch.tensor([[40, 40], [9, 9]], dtype=torch.int32)
    assert sa.attended_tokens(keep, 0, 0.25).tolist() == [10, 3]
    assert sa.attended_tokens(keep, 7, 0.0).tolist() == [7, 7]
