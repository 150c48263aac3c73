"""`explain` shows the surgery: sites found, passes in order, nodes inserted per graph, cache bytes."""

import kvsurgery
from kvsurgery.testing import greedy, left_padded_batch, tiny_model


def test_explain_before_and_after_running():
    model = tiny_model("qwen3", layers=2)
    kvsurgery.apply(model, "pyramidkv", budget=10)
    text = str(kvsurgery.explain(model))
    assert "recipe 'snapkv(window=8,kernel=7,pool=max)+pyramidkv', budget 10 tokens on Qwen3ForCausalLM" in text
    assert "layers 0-1 model.layers.{i}.self_attn: sdpa, 4 q heads / 2 kv heads, head_dim 16" in text
    assert "added by default: snapkv(window=8,kernel=7,pool=max) (for scores, required by pyramidkv)" in text
    assert "no graph rewritten yet" in text

    ids, mask = left_padded_batch([30, 22], seed=0)
    greedy(model, ids, mask, new=3)
    text = str(kvsurgery.explain(model))
    assert "prefill graph: before {" in text and "'kvsurgery.kv_update': 2" in text
    assert "layers 0-1: snapkv: kvsurgery.score_window; select: kvsurgery.select_compact_" in text
    assert "layers 0-1: select: kvsurgery.append_; attend: kvsurgery.attend" in text
    assert "'kvsurgery.attend': 2" in text and "decode graph" in text
    assert "MiB allocated (batch 2, prompt 30 tokens, 2 layers)" in text
    assert "kept at prefill + room for 3 decoded tokens" in text
    assert "an uncompressed cache of the same tokens" in text
    explanation = kvsurgery.explain(model)
    assert explanation.store_bytes < explanation.uncompressed_bytes()
