"""Reliability: padded rows equal single runs, long generation against an independent reference, devices."""

import pytest
import torch
from transformers import DynamicCache

import kvsurgery
from kvsurgery.errors import BudgetError
from kvsurgery.testing import greedy, left_padded_batch, tiny_model

LENGTHS = [26, 19, 12]


@pytest.mark.parametrize(
    ("recipe", "budget"),
    [("snapkv(window=4)", 10), ("pyramidkv", 0.8), ("adakv", 10), ("h2o(window=4)", 10), ("streaming", 10)],
)
def test_each_padded_row_equals_the_prompt_run_alone(recipe, budget):
    """Per-row budgets follow each row's own prompt length (fractions too); ties break by position."""
    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch(LENGTHS, seed=3)
    kvsurgery.apply(model, recipe, budget=budget)
    batch = greedy(model, ids, mask, new=10)
    for row, n in enumerate(LENGTHS):
        alone = greedy(model, ids[row : row + 1, ids.shape[1] - n :], None, new=10)
        assert torch.equal(batch[row], alone[0]), f"row {row} ({n} tokens) differs from its single run"


# -- an independent reference of decode-time eviction: the untouched model plus a sliced DynamicCache --------
def _keep_per_head(cache: DynamicCache, keep: list[list[torch.Tensor]]) -> None:
    """Keep token indices `keep[layer][kv_head]` (same count per head) in every layer of a DynamicCache."""
    for layer, heads in zip(cache.layers, keep, strict=True):
        layer.keys = torch.stack([layer.keys[0, h, idx] for h, idx in enumerate(heads)])[None]
        layer.values = torch.stack([layer.values[0, h, idx] for h, idx in enumerate(heads)])[None]


def reference_generate(model, ids: torch.Tensor, budget: int, new: int, policy: str, window: int, sinks: int):
    """Greedy decoding with StreamingLLM or H2O eviction, written directly against transformers' cache.

    Per layer and KV head it tracks the positions held and (H2O) their accumulated attention, evicts one token
    before each step once `budget` tokens are held, then lets the model append the new token and attend.
    """
    n_layers = model.config.num_hidden_layers
    n_kv = model.config.num_key_value_heads
    group = model.config.num_attention_heads // n_kv
    t = ids.shape[1]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, output_attentions=True)
    # positions[layer][head]: token index of each cached entry; acc: its accumulated attention (H2O)
    positions, acc, keep = [], [], []
    for layer in range(n_layers):
        probs = out.attentions[layer][0].view(n_kv, group, t, t).mean(1).sum(1)  # received attention per key
        heads_pos, heads_acc, heads_keep = [], [], []
        for h in range(n_kv):
            if policy == "streaming":
                chosen = list(range(min(sinks, t))) + list(range(max(sinks, t - (budget - sinks)), t))
            else:
                recent = list(range(max(0, t - window), t))
                order = [i for i in torch.argsort(probs[h], descending=True, stable=True).tolist() if i not in recent]
                chosen = sorted(order[: budget - len(recent)] + recent)
            heads_keep.append(torch.tensor(chosen))
            heads_pos.append(chosen)
            heads_acc.append([float(probs[h, i]) for i in chosen])
        positions.append(heads_pos)
        acc.append(heads_acc)
        keep.append(heads_keep)
    _keep_per_head(cache, keep)
    token = out.logits[:, -1:].argmax(-1)
    tokens = [token]
    for step in range(new - 1):
        seen = t + step  # index of the token being fed
        keep = []
        for layer in range(n_layers):
            heads_keep = []
            for h in range(n_kv):
                pos, scores = positions[layer][h], acc[layer][h]
                idx = list(range(len(pos)))
                if len(pos) >= budget:
                    protected = set(sorted(pos)[:sinks]) | {p for p in pos if p >= seen - window}
                    candidates = [i for i in idx if pos[i] not in protected]
                    ranking = scores if policy == "h2o" else pos
                    victim = min(candidates, key=ranking.__getitem__)
                    idx.remove(victim)
                positions[layer][h] = [pos[i] for i in idx] + [seen]
                acc[layer][h] = [scores[i] for i in idx] + [0.0]
                heads_keep.append(torch.tensor(idx))
            keep.append(heads_keep)
        _keep_per_head(cache, keep)
        with torch.no_grad():
            out = model(token, past_key_values=cache, position_ids=torch.tensor([[seen]]), output_attentions=True)
        for layer in range(n_layers):
            received = out.attentions[layer][0, :, 0].view(n_kv, group, -1).mean(1)
            for h in range(n_kv):
                acc[layer][h] = [a + float(r) for a, r in zip(acc[layer][h], received[h], strict=True)]
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, 1)[0]


@pytest.mark.parametrize(
    ("recipe", "policy", "window", "sinks"), [("streaming", "streaming", 0, 4), ("h2o", "h2o", 3, 0)]
)
def test_long_generation_matches_the_reference_and_keeps_fixed_capacity(recipe, policy, window, sinks):
    budget, new = 8, 32  # 4x more new tokens than the budget
    model = tiny_model("llama", attn="eager", layers=2, seed=11)
    ids, _ = left_padded_batch([20], seed=11)
    expected = reference_generate(model, ids, budget, new, policy, window, sinks)
    options = {"window": window} if policy == "h2o" else {"sinks": sinks}
    kvsurgery.apply(model, f"{recipe}({','.join(f'{k}={v}' for k, v in options.items())})", budget=budget)
    cache = kvsurgery.new_cache(model, max_new_tokens=new)
    out = model(ids, past_key_values=cache)
    bytes_after_prefill = cache.nbytes
    token = out.logits[:, -1:].argmax(-1)
    tokens = [token]
    for _ in range(new - 1):
        out = model(token, past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        assert all(int(layer.length.max()) <= budget for layer in cache.layers)
    assert cache.nbytes == bytes_after_prefill, "the cache never grows"
    assert torch.equal(torch.cat(tokens, 1)[0], expected)


def test_dispatched_model_keeps_each_layer_store_on_its_device():
    """accelerate hooks (device_map) stay traceable; each layer's store lives on that layer's device."""
    from accelerate import dispatch_model

    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch([14, 9], seed=1)
    expected = greedy(model, ids, mask, new=6)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = dispatch_model(model, device_map=device_map)
    kvsurgery.apply(model, "full")
    assert torch.equal(greedy(model, ids, mask, new=6), expected)
    for i, layer in enumerate(model._kvsurgery.last_store.layers):
        assert layer.k.device == next(model.model.layers[i].parameters()).device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layers_split_between_gpu_and_cpu_keep_their_stores_local():
    from accelerate import dispatch_model

    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch([14, 9], seed=1)
    expected = greedy(model, ids, mask, new=6)
    device_map = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": 0,
        "lm_head": "cpu",
    }
    model = dispatch_model(model, device_map=device_map)
    kvsurgery.apply(model, "snapkv(window=4)", budget=64)
    assert torch.equal(greedy(model, ids.cuda(), mask.cuda(), new=6).cpu(), expected)
    store = model._kvsurgery.last_store
    assert store.layers[0].k.device.type == "cuda" and store.layers[1].k.device.type == "cpu"


def test_bfloat16_model_runs_compressed():
    model = tiny_model("qwen3", dtype=torch.bfloat16)
    ids, mask = left_padded_batch([24, 17], seed=2)
    kvsurgery.apply(model, "pyramidkv", budget=12)
    out = greedy(model, ids, mask, new=5)
    assert out.shape == (2, 5)
    assert model._kvsurgery.last_store.layers[0].k.dtype == torch.bfloat16


def test_budget_beyond_the_model_context_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(BudgetError, match="exceeds the model's context length of 1024 tokens"):
        kvsurgery.apply(model, "snapkv", budget=5000)
