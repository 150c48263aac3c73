"""kvpress timing for `kvsurgery bench`, run by the python of a separate venv with kvpress (it pins
transformers<5.3, so this file imports nothing from kvsurgery). argv[1] is a JSON job; the last line printed is
JSON: prefill_s, decode_ms, peak_gib, cache_bytes. The decode loop is greedy and eager (kvpress has no compiled
path), with explicit positions since the compressed cache is shorter than the prompt.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from kvpress import SnapKVPress
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(job: dict) -> dict:
    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    config = LlamaConfig(**job["config"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(job["seed"])
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, torch_dtype=dtype).eval()
    gen = torch.Generator().manual_seed(job["seed"])
    ids = torch.randint(3, config.vocab_size, (job["batch"], job["context"]), generator=gen).to(device)
    press = SnapKVPress(compression_ratio=job["compression_ratio"])

    def once() -> tuple[float, float, int]:
        cache = DynamicCache()
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), press(model):
            logits = model(ids, past_key_values=cache).logits
        _sync(device)
        prefill = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        steps = job["new_tokens"] - 1
        with torch.no_grad():
            for i in range(steps):
                position = torch.full_like(token, job["context"] + i)
                token = model(token, past_key_values=cache, position_ids=position).logits[:, -1:].argmax(-1)
        _sync(device)
        decode_ms = (time.perf_counter() - start) / max(steps, 1) * 1e3
        cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        return prefill, decode_ms, cache_bytes

    once()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode_ms, cache_bytes = once()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(prefill_s=prefill, decode_ms=decode_ms, peak_gib=peak, cache_bytes=cache_bytes)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
