"""The cache keyword: transformers 5.24 renamed `past_key_values` to `cache`. Either name works on every supported
version, and the store the model writes to is always the one kvsurgery allocated."""

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

import kvsurgery
from kvsurgery.compat import CACHE_KEYWORDS, cache_keyword, output_cache
from kvsurgery.errors import KVSurgeryError
from kvsurgery.testing import left_padded_batch, tiny_model

PROMPT = 10


def test_the_model_keyword_follows_the_installed_transformers():
    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    assert cache_keyword(tiny_model("llama")) == expected


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_forward_writes_to_the_store_it_is_given(keyword):
    model = tiny_model("llama")
    ids, _ = left_padded_batch([PROMPT], seed=0)
    reference = DynamicCache(config=model.config)
    ref_logits = [model(ids, use_cache=True, **{cache_keyword(model): reference}).logits]
    kvsurgery.apply(model, "full")
    store = kvsurgery.new_cache(model, max_new_tokens=2)

    out = model(ids, **{keyword: store})
    assert output_cache(out) is store
    assert store.prefilled and int(store.get_seq_length()) == PROMPT
    logits = [out.logits]
    token = out.logits[:, -1:].argmax(-1)
    ref_logits.append(
        model._kvsurgery.original_forward(token, use_cache=True, **{cache_keyword(model): reference}).logits
    )
    out = model(token, **{keyword: store})
    logits.append(out.logits)

    assert output_cache(out) is store and int(store.get_seq_length()) == PROMPT + 1
    assert model._kvsurgery.last_store is store
    for got, want in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_generate_writes_to_the_store_it_is_given(keyword):
    model = tiny_model("llama")
    ids, mask = left_padded_batch([PROMPT], seed=1)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    kvsurgery.apply(model, "full")
    store = kvsurgery.new_cache(model, max_new_tokens=4)

    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, **{keyword: store}
    )

    assert model._kvsurgery.last_store is store
    assert int(store.get_seq_length()) == PROMPT + 3  # the last generated token is never fed back
    assert torch.equal(out, expected)


def test_generate_without_a_cache_allocates_its_own():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([PROMPT], seed=2)
    kvsurgery.apply(model, "full")
    model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    store = model._kvsurgery.last_store
    assert store is not None and int(store.get_seq_length()) == PROMPT + 2


def test_both_keywords_at_once_are_refused():
    model = tiny_model("llama")
    ids, _ = left_padded_batch([PROMPT], seed=0)
    kvsurgery.apply(model, "full")
    with pytest.raises(KVSurgeryError, match="both as cache= and as past_key_values="):
        model(ids, cache=kvsurgery.new_cache(model), past_key_values=kvsurgery.new_cache(model))
    with pytest.raises(KVSurgeryError, match="both as cache= and as past_key_values="):
        model.generate(ids, max_new_tokens=2, cache=kvsurgery.new_cache(model), past_key_values=DynamicCache())


def test_a_second_cache_beside_the_store_is_refused():
    model = tiny_model("llama")
    ids, _ = left_padded_batch([PROMPT], seed=0)
    kvsurgery.apply(model, "full")
    with pytest.raises(KVSurgeryError, match="DynamicCache as cache_params= besides kvsurgery's compressed cache"):
        model(ids, cache=kvsurgery.new_cache(model), cache_params=DynamicCache())


def test_writing_to_an_unallocated_store_is_an_error():
    model = tiny_model("llama")
    ids, _ = left_padded_batch([PROMPT], seed=0)
    kvsurgery.apply(model, "full")
    with pytest.raises(KVSurgeryError, match="never allocated"):
        model._kvsurgery.original_forward(
            input_ids=ids, use_cache=True, **{cache_keyword(model): kvsurgery.new_cache(model)}
        )
