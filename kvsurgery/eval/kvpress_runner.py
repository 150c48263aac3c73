"""Runs kvpress presses on token-id prompts; executed by a separate environment's python (kvpress pins
transformers<5.3), never imported by kvsurgery. Protocol: `python kvpress_runner.py JOB.json RESULTS.jsonl`.

JOB.json:   {"model": folder, "dump_kept": bool,
             "jobs": [{"label": "kvpress:snapkv", "press": "snapkv", "options": {...}}],   # press "full" = no press
             "samples": [{"key": str, "ids": [int], "max_new_tokens": int, "keep": int | null}]}
RESULTS:    one JSON line per (job, sample): {"label", "key", "generated": [int], "kept_tokens": float,
             "cache_bytes": int, "seconds": float, "kept": [[[int]]] (layer, KV head) when dump_kept}
Each prompt is compressed whole (`with press(model): model(ids)`, like kvsurgery's prefill), then decoded
greedily with positions continuing after the prompt, as kvpress's own pipeline does. `keep` is the number of
tokens per KV head kvsurgery keeps; the compression ratio is set so kvpress keeps exactly as many.
Progress: one line "done N" on stdout per finished prompt.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from kvpress import (
    AdaKVPress,
    ExpectedAttentionPress,
    KnormPress,
    PyramidKVPress,
    ScorerPress,
    SnapKVPress,
    StreamingLLMPress,
)
from transformers import AutoModelForCausalLM, DynamicCache

ALIASES = {"window": "window_size", "kernel": "kernel_size", "sinks": "n_sink", "floor": "alpha_safeguard"}


def make_press(name: str, options: dict):
    """A kvpress press from a name and kvsurgery-style option names (window, kernel, sinks, floor, beta)."""
    opts = {ALIASES.get(k, k): v for k, v in options.items()}
    if name == "full":
        return None
    if name == "snapkv":
        return SnapKVPress(**opts)
    if name == "pyramidkv":
        return PyramidKVPress(**opts)
    if name == "streaming":
        return StreamingLLMPress(**opts)
    if name == "expected":
        return ExpectedAttentionPress(**opts)
    if name == "knorm":
        return KnormPress(**opts)
    if name == "adakv":
        safeguard = opts.pop("alpha_safeguard", 0.2)
        return AdaKVPress(SnapKVPress(**opts), alpha_safeguard=safeguard)
    raise SystemExit(
        f"kvpress_runner: unknown press {name!r} (full, snapkv, pyramidkv, streaming, expected, knorm, adakv)"
    )


def set_ratio(press, n_tokens: int, keep: int | None) -> None:
    """compression_ratio so that int(T * (1 - ratio)) == keep (kvpress's own rounding), i.e. 1 - budget."""
    if press is None or keep is None:
        return
    press.compression_ratio = 0.0 if keep >= n_tokens else 1.0 - (keep + 0.5) / n_tokens


class KeptRecorder:
    """Wraps a ScorerPress's score() to record the indices its compress() keeps (same topk on the same scores)."""

    def __init__(self, press):
        self.press, self.kept = press, []
        self._score = press.score
        press.score = self.score

    def score(self, module, hidden_states, keys, *args, **kwargs):
        scores = self._score(module, hidden_states, keys, *args, **kwargs)
        n_kept = int(keys.shape[2] * (1 - self.press.compression_ratio))
        idx = scores.topk(n_kept, dim=-1).indices[0].sort(dim=-1).values
        self.kept.append(idx.tolist())
        return scores


@torch.no_grad()
def run_one(model, press, ids: list[int], max_new_tokens: int, eos: set[int]) -> dict:
    input_ids = torch.tensor([ids])
    n_tokens = input_ids.shape[1]
    cache = DynamicCache()
    start = time.perf_counter()
    if press is None:
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    else:
        with press(model):
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    layers = model.model.layers
    kept = []
    for i, layer in enumerate(cache.layers):
        length = layer.keys.shape[2]
        masked = getattr(layers[i].self_attn, "masked_key_indices", None)  # AdaKV masks instead of shrinking
        n_masked = len(masked[0]) if masked is not None else 0
        kept.append(length - n_masked / layer.keys.shape[1])
    generated = [int(out.logits[0, -1].argmax())]
    for step in range(max_new_tokens - 1):
        if generated[-1] in eos:
            break
        out = model(
            input_ids=torch.tensor([[generated[-1]]]),
            past_key_values=cache,
            position_ids=torch.tensor([[n_tokens + step]]),
            use_cache=True,
        )
        generated.append(int(out.logits[0, -1].argmax()))
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {
        "generated": generated,
        "kept_tokens": sum(kept) / len(kept),
        "cache_bytes": cache_bytes,
        "seconds": time.perf_counter() - start,
    }


def main(job_path: str, results_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    done = 0
    with open(results_path, "a") as results:
        for spec in job["jobs"]:
            press = make_press(spec["press"], spec.get("options", {}))
            for sample in job["samples"]:
                set_ratio(press, len(sample["ids"]), sample.get("keep"))
                recorder = KeptRecorder(press) if job.get("dump_kept") and isinstance(press, ScorerPress) else None
                row = run_one(model, press, sample["ids"], sample["max_new_tokens"], eos)
                if recorder is not None:
                    row["kept"] = recorder.kept
                    press.score = recorder._score
                results.write(json.dumps({"label": spec["label"], "key": sample["key"], **row}) + "\n")
                results.flush()
                done += 1
                print(f"done {done}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python kvpress_runner.py JOB.json RESULTS.jsonl")
    sys.exit(main(sys.argv[1], sys.argv[2]))
