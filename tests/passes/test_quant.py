"""Quantization recipes on tiny models: the same kept tokens as the eviction recipe alone, allocated bytes equal to
the codes + statistics + full-precision arithmetic, sliding layers left exact, clear errors."""

import pytest
import torch

import kvsurgery
from kvsurgery.errors import RecipeError, UnsupportedModelError
from kvsurgery.manager import build_recipe
from kvsurgery.pass_base import Pass, SiteRewrite
from kvsurgery.reference.quant import read_packed
from kvsurgery.reference.quant_codes import QuantSpec, dequantize_tokens, quantize_tokens
from kvsurgery.testing import greedy, left_padded_batch, tiny_model

PROMPT, NEW, D, ITEM = 120, 4, 64, 4  # float32 model, head_dim 64


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def kivi_bytes(kept: int, bits: int, group: int, residual: int) -> tuple[int, int]:
    """(bytes, full-precision tokens) of one KV head of KIVI: whole key groups of `group` tokens are packed once the
    residual is full."""
    total = kept + NEW
    packed = _ceil_to(max(0, total - residual), group)
    codes = 2 * packed * D * bits // 8
    stats = 2 * ITEM * (packed // group * D + packed * D // group)  # keys: per channel per group; values: per token
    dense = min(total, residual)
    return codes + stats + dense * 2 * D * ITEM, dense


def calibquant_bytes(kept: int, bits: int, recent: int) -> tuple[int, int]:
    """(bytes, full-precision tokens) of one KV head of CalibQuant: all but the `recent` newest kept prompt tokens
    packed, one (scale, lo) per channel; decoded tokens in full precision."""
    packed = max(0, kept - recent)
    dense = kept - packed + NEW
    return 2 * packed * D * bits // 8 + 2 * 2 * D * ITEM + dense * 2 * D * ITEM, dense


def _store_of(model, recipe: str, budget, ids, mask):
    kvsurgery.apply(model, recipe, budget=budget)
    try:
        greedy(model, ids, mask, new=NEW)
        return model._kvsurgery.last_store, str(kvsurgery.explain(model))
    finally:
        kvsurgery.restore(model)


def _kept(layer, b: int, h: int) -> list[int]:
    s, n = int(layer.start[b, h]), int(layer.length[b, h])
    return layer.pos[b, s : s + n].tolist()


@pytest.mark.parametrize(
    ("base", "quant", "per_head_bytes"),
    [
        ("full", "kivi2(residual=32)", lambda n: kivi_bytes(n, 2, 32, 32)),
        ("snapkv(window=4)", "kivi4(residual=32)", lambda n: kivi_bytes(n, 4, 32, 32)),
        ("pyramidkv", "quant1bit", lambda n: calibquant_bytes(n, 1, 32)),
    ],
)
def test_quantization_keeps_the_recipes_tokens_in_the_memory_it_claims(base, quant, per_head_bytes):
    """The quantized store holds exactly the tokens the eviction recipe keeps (the oldest packed, round-tripping
    through their codes); its allocated bytes equal codes + statistics + the full-precision part within 5%."""
    model = tiny_model("llama", layers=3, heads=4, kv_heads=2, head_dim=D)
    ids, mask = left_padded_batch([PROMPT, PROMPT - 9], seed=4)
    budget = None if base == "full" else 60
    plain, _ = _store_of(model, base, budget, ids, mask)
    recipe = quant if base == "full" else f"{base}+{quant}"
    store, text = _store_of(model, recipe, budget, ids, mask)

    name = quant.split("(")[0]
    assert f"{name}: kvsurgery.select_quantized_" in text
    assert f"{name}: kvsurgery.append_quantized_, kvsurgery.attend_quantized" in text
    spec_k = _key_spec(quant)
    expected, packed_tokens = 0, 0
    for pl, ql in zip(plain.layers, store.layers, strict=True):
        for b in range(2):
            for h in range(2):
                kept = _kept(pl, b, h)  # the prompt tokens kept + the NEW - 1 decoded ones
                n_packed = int(ql.planes["q_len"][b, h])
                packed_tokens += n_packed
                assert _kept(ql, b, h) == kept[n_packed:], "the newest kept tokens stay in full precision"
                start = int(pl.start[b, h])
                exact = pl.k[b, start : start + n_packed]  # the unquantized store's keys of the packed tokens
                got = read_packed(*_planes(ql, "qk"), spec_k, ql.planes["q_start"], n_packed, torch.float64)[b, h]
                torch.testing.assert_close(got, _direct(exact, spec_k))
        # every batch row is allocated for the plan (the longest row's budget), as the unquantized store is
        heads = [per_head_bytes(keep) for keep in ql.plan.keep]
        expected += 2 * sum(nbytes for nbytes, _ in heads)
        assert ql.k.shape[1] == sum(dense for _, dense in heads), "no full-precision slot beyond the dense part"
    assert packed_tokens > 0
    assert abs(store.nbytes - expected) <= 0.05 * expected, (store.nbytes, expected)


def _key_spec(quant: str) -> QuantSpec:
    recipe = build_recipe(quant if "kivi" in quant else f"snapkv+{quant}", budget=None if "kivi" in quant else 60)
    return next(p for p in recipe.passes if "quant" in p.provides).layout().k


def _planes(layer, prefix: str):
    return layer.planes[f"{prefix}_codes"], layer.planes[f"{prefix}_scale"], layer.planes[f"{prefix}_low"]


def _direct(tokens: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if len(tokens) == 0:
        return tokens.double()
    codes, scale, low = quantize_tokens(tokens, torch.ones(len(tokens), dtype=torch.bool), spec, tokens.dtype)
    return dequantize_tokens(codes, scale, low, spec, torch.float64)


def test_kivi_with_a_residual_covering_the_sequence_is_exact_and_sliding_layers_stay_full_precision():
    """Gemma 3 alternates sliding and global layers: global layers get the quantized store, sliding ones the core
    ops; with nothing old enough to pack, generation equals the uncompressed model token for token."""
    model = tiny_model("gemma3", layers=2, heads=4, kv_heads=2, head_dim=32, sliding_window=16)
    ids, mask = left_padded_batch([40, 33], seed=2)
    expected = greedy(model, ids, mask, new=6)
    kvsurgery.apply(model, "kivi4(residual=64)")
    try:
        assert torch.equal(greedy(model, ids, mask, new=6), expected)
        text = str(kvsurgery.explain(model))
        assert "layer 0: select: kvsurgery.append_; attend: kvsurgery.attend" in text
        assert "layer 1: kivi4: kvsurgery.append_quantized_, kvsurgery.attend_quantized" in text
        assert "layer 0: sliding window 16" in text and "kivi4: packed K 4-bit per channel" in text
        store = model._kvsurgery.last_store
        assert "q_len" not in store.layers[0].planes and int(store.layers[1].planes["q_len"].sum()) == 0
    finally:
        kvsurgery.restore(model)


def _even_tokens(k: torch.Tensor) -> torch.Tensor:
    b, _, t, _ = k.shape
    return (torch.arange(t, device=k.device) % 2 == 0).expand(b, t)


@kvsurgery.register_pass
class EvenTokensVisualTest(Pass):
    """Test pass: marks even prompt positions as visual (the "is_visual" product csp provides for VLMs)."""

    name = "even_visual_test"
    phase = "score"
    products = frozenset({"is_visual"})

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase == "prefill":
            rw.products["is_visual"] = rw.call(self.name, _even_tokens, (rw.k,))


def test_a_modality_mask_sends_text_tokens_to_the_full_precision_slots():
    """quant1bit packs every visual token; its `recent` full-precision slots go to the newest text tokens."""
    model = tiny_model("llama", layers=1, head_dim=16)
    ids, _ = left_padded_batch([30], seed=1)
    kvsurgery.apply(model, "even_visual_test+quant1bit(recent=6)")
    try:
        greedy(model, ids, None, new=3)
        layer = model._kvsurgery.last_store.layers[0]
        for h in range(2):
            assert _kept(layer, 0, h) == [19, 21, 23, 25, 27, 29, 30, 31], "text tokens, then the decoded ones"
            assert int(layer.planes["q_len"][0, h]) == 24
        assert "even_visual_test: _even_tokens; quant1bit: kvsurgery.select_quantized_" in str(kvsurgery.explain(model))
    finally:
        kvsurgery.restore(model)


def test_unsupported_dtype_is_refused():
    model = tiny_model("llama", layers=1, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match=r"'kivi2' quantizes float32, float16 or bfloat16.*torch.float64"):
        kvsurgery.apply(model, "kivi2")


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("kivi2(bits=3)", r"invalid options for 'kivi2': bits must be one of \(1, 2, 4\), got 3"),
        ("quant1bit(bits=8)", r"bits must be one of \(1, 2, 4\), got 8"),
        ("kivi4(group=32,residual=48)", "residual 48 must be a multiple of the group size 32"),
        ("kivi2(residual=16)", r"residual \(16\) must be at least one group \(32 tokens\)"),
        ("quant1bit(range=quantile,alpha=0.6)", r"alpha .* must be in \[0, 0.5\)"),
        ("kivi2+quant1bit", "'kivi2' and 'quant1bit' both provide quant"),
    ],
)
def test_bad_options_are_clear_errors(recipe, message):
    with pytest.raises(RecipeError, match=message):
        build_recipe(recipe)


def test_group_not_dividing_head_dim_and_decode_eviction_are_refused_at_apply():
    model = tiny_model("llama", layers=1, head_dim=16)
    with pytest.raises(RecipeError, match=r"group size 32 does not divide value head_dim 16; .* e\.g\. group=16"):
        kvsurgery.apply(model, "kivi2")
    with pytest.raises(RecipeError, match="cannot be combined with decode-time eviction"):
        kvsurgery.apply(model, "streaming+quant1bit(bits=2)", budget=8)
    assert "_kvsurgery" not in model.__dict__
