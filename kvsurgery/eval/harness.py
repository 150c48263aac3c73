"""Runs recipes on task samples: apply/restore per (recipe, budget), greedy decoding, one record per prompt
with its score, the cache bytes actually allocated and what an uncompressed cache would take."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch

import kvsurgery
from kvsurgery.budget import Budget
from kvsurgery.eval.tasks import Sample, score


@dataclass
class Record:
    """One prompt run under one (recipe, budget)."""

    recipe: str
    budget: float | None
    task: str
    length: int
    index: int
    n_tokens: int
    prediction: str
    score: float
    cache_bytes: int  # bytes of the cache after generate: kvsurgery's allocated store, kvpress's DynamicCache
    full_bytes: int  # an uncompressed cache of the same prompt and decode room
    kept_tokens: float  # tokens per KV head kept after prefill, averaged over layers and heads
    seconds: float
    kept: list | None = field(default=None, repr=False)  # [layer][KV head] kept prompt-token indices (on request)

    @property
    def key(self) -> str:
        return sample_key(self.task, self.length, self.index)

    def to_json(self) -> dict:
        out = asdict(self)
        if out["kept"] is None:
            del out["kept"]
        return out


def sample_key(task: str, length: int, index: int) -> str:
    return f"{task}/{length}/{index}"


def keep_tokens(budget: float | None, n_tokens: int) -> int | None:
    """Tokens per KV head kvsurgery keeps for a fractional budget (sinks and window included)."""
    return None if budget is None else min(n_tokens, Budget.parse(budget).resolve(n_tokens))


def decode_room(samples: Iterable[Sample]) -> int:
    """One decode room for every prompt of a run, so the store's shape (and Dynamo's graphs) stay the same."""
    return max(s.max_new_tokens for s in samples)


def kv_bytes_per_token(model) -> int:
    """Bytes one token's keys and values take over all layers, uncompressed (full attention layers)."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = next(model.parameters()).element_size()
    return config.num_hidden_layers * n_kv * 2 * head_dim * element


def _kept_indices(store, n_tokens: int) -> list[list[list[int]]]:
    out = []
    for layer in store.layers:
        heads = []
        for h in range(layer.start.shape[1]):
            s, n = int(layer.start[0, h]), int(layer.length[0, h])
            pos = layer.pos[0, s : s + n]
            heads.append(sorted(int(p) for p in pos if 0 <= p < n_tokens))
        out.append(heads)
    return out


@torch.no_grad()
def run_recipe(
    model,
    tokenizer,
    samples: list[Sample],
    recipe: str,
    budget: float | None,
    progress=None,
    dump_kept: bool = False,
) -> list[Record]:
    """Apply `recipe` at `budget` (a fraction of each prompt), run every sample greedily, restore the model."""
    room = decode_room(samples)
    kvsurgery.apply(model, recipe, budget=budget, max_new_tokens=room)
    records = []
    try:
        for sample in samples:
            ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
            start = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                cache=kvsurgery.new_cache(model, room),
                max_new_tokens=sample.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            seconds = time.perf_counter() - start
            prediction = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            explanation = kvsurgery.explain(model)
            store = model._kvsurgery.last_store
            kept = sum(float(layer.keep.float().mean()) for layer in store.layers) / len(store.layers)
            records.append(
                Record(
                    recipe=recipe,
                    budget=budget,
                    task=sample.task,
                    length=sample.length,
                    index=sample.index,
                    n_tokens=ids.shape[1],
                    prediction=prediction,
                    score=score(sample.scoring, prediction, sample.answers),
                    cache_bytes=explanation.store_bytes,
                    full_bytes=explanation.uncompressed_bytes(),
                    kept_tokens=kept,
                    seconds=seconds,
                    kept=_kept_indices(store, ids.shape[1]) if dump_kept else None,
                )
            )
            if progress is not None:
                progress.update(1)
    finally:
        kvsurgery.restore(model)
    return records
