"""Clear errors: non-causal models, unsupported attention, overflow, misuse; never a silent fallback."""

import pytest
import torch
from transformers import AttentionInterface, BertConfig, BertModel

import kvsurgery
from kvsurgery.errors import CacheCapacityError, KVSurgeryError, SurgeryNotAppliedError, UnsupportedModelError
from kvsurgery.testing import left_padded_batch, tiny_model


def test_non_causal_model_is_refused():
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="BertModel is not a causal language model"):
        kvsurgery.apply(bert, "full")


def test_not_a_transformers_model():
    with pytest.raises(UnsupportedModelError, match="Linear is not a transformers model"):
        kvsurgery.apply(torch.nn.Linear(2, 2), "full")


def _einsum_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """An attention kvsurgery does not recognise (einsum, no SDPA, no matmul)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    weights = torch.einsum("bhqd,bhkd->bhqk", query, key) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    out = torch.einsum("bhqk,bhkd->bhqd", weights.softmax(-1), value)
    return out.transpose(1, 2).contiguous(), None


def test_unrecognised_attention_names_the_module():
    AttentionInterface.register("einsum_test", _einsum_attention)
    model = tiny_model("llama", attn="eager")
    model.set_attn_implementation("einsum_test")
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.self_attn updates a KV cache"):
        kvsurgery.apply(model, "full")


def test_applying_twice_is_an_error():
    model = tiny_model("llama")
    kvsurgery.apply(model, "full")
    with pytest.raises(KVSurgeryError, match=r"already applied.*kvsurgery\.restore"):
        kvsurgery.apply(model, "snapkv", budget=32)


def test_restore_gives_back_the_original_model():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([12, 9], seed=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(ids, attention_mask=mask).logits
    kvsurgery.apply(model, "snapkv(window=4)", budget=8)
    model.generate(ids, attention_mask=mask, max_new_tokens=3)
    kvsurgery.restore(model)
    assert "forward" not in model.__dict__ and "_kvsurgery" not in model.__dict__
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids, attention_mask=mask).logits, expected)
    with pytest.raises(KVSurgeryError, match="no kvsurgery applied"):
        kvsurgery.restore(model)


def test_decoding_past_the_cache_room_is_an_error():
    model = tiny_model("llama")
    ids, _ = left_padded_batch([10], seed=0)
    kvsurgery.apply(model, "snapkv(window=4)", budget=8)
    cache = kvsurgery.new_cache(model, max_new_tokens=2)
    out = model(ids, past_key_values=cache)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(2):
        out = model(token, past_key_values=cache)
    with pytest.raises(CacheCapacityError, match="room for 2 decoded tokens"):
        model(token, past_key_values=cache)


def test_a_foreign_cache_is_refused():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids, _ = left_padded_batch([10], seed=0)
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache)  # untouched model fills a DynamicCache
    kvsurgery.apply(model, "full")
    with pytest.raises(KVSurgeryError, match="got a DynamicCache holding 10 tokens"):
        model(ids[:, -1:], past_key_values=cache)


def test_beam_search_is_refused():
    model = tiny_model("llama")
    ids, _ = left_padded_batch([10], seed=0)
    kvsurgery.apply(model, "full")
    with pytest.raises(KVSurgeryError, match="beam search"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)


def test_running_the_marker_unrewritten_raises():
    model = tiny_model("llama")
    kvsurgery.apply(model, "full")
    ids, _ = left_padded_batch([6], seed=0)
    cache = kvsurgery.new_cache(model)
    cache.allocate(1, 6)
    with pytest.raises(SurgeryNotAppliedError, match="never falls back to uncompressed attention"):
        model._kvsurgery.original_forward(input_ids=ids, past_key_values=cache)
