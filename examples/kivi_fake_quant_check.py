"""Is kivi2's accuracy on SmolLM2 the method's or a bug? Re-run its prompts with an independent KIVI simulation.

    python examples/kivi_fake_quant_check.py RESULTS_DIR [--task niah_single] [--lengths 1024,2048] [--n 5]

RESULTS_DIR is a `kvsurgery eval` output holding `kivi2` records. The simulation shares no code with kvsurgery's
quantization: it prefills transformers' own DynamicCache, fake-quantizes the cached keys (per channel over groups
of 32 tokens) and values (per token over groups of 32 channels) at 2 bits with min-max ranges, leaving the
newest tokens in full precision as KIVI's residual does, then decodes greedily on that cache. Equal answers mean
the two implement the same method; EVAL.md records the outcome.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from transformers import DynamicCache

from kvsurgery.eval import tasks
from kvsurgery.models import load_model

BITS, GROUP, RESIDUAL = 2, 32, 128


def fake_quant(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Min-max asymmetric quantization of x over `dim`, read back in x's dtype."""
    levels = 2**BITS - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (hi - lo) / levels
    codes = ((x - lo) / scale.clamp_min(1e-12)).round().clamp(0, levels)
    return torch.where(scale > 0, codes * scale + lo, lo)


def quantize_cache(cache: DynamicCache, n_tokens: int) -> None:
    """KIVI at prefill: every whole group of the tokens beyond the residual is quantized in place."""
    packed = -(-max(0, n_tokens - RESIDUAL) // GROUP) * GROUP
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        b, h, _, d = k.shape
        k[:, :, :packed] = fake_quant(k[:, :, :packed].reshape(b, h, -1, GROUP, d), 3).reshape(b, h, packed, d)
        v[:, :, :packed] = fake_quant(v[:, :, :packed].reshape(b, h, packed, -1, GROUP), 4).reshape(b, h, packed, d)


@torch.no_grad()
def simulate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    cache = DynamicCache()
    logits = model(ids, past_key_values=cache, use_cache=True).logits
    quantize_cache(cache, ids.shape[1])
    out = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out.append(model(out[-1], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(out, 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a kvsurgery eval output folder with kivi2 records")
    parser.add_argument("--task", default="niah_single")
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--n", type=int, default=5)
    args = parser.parse_args()

    records = json.loads((pathlib.Path(args.results) / "results.json").read_text())["records"]
    ours = {(r["task"], r["length"], r["index"]): r["prediction"] for r in records if r["recipe"] == "kivi2"}
    model, tokenizer = load_model("smollm2-135m")
    same = total = 0
    for length in (int(x) for x in args.lengths.split(",")):
        for s in tasks.generate(tokenizer, args.task, length, n=args.n, seed=0):
            if (s.task, s.length, s.index) not in ours:
                continue
            ids = tokenizer(s.prompt, return_tensors="pt").input_ids
            text = tokenizer.decode(simulate(model, ids, s.max_new_tokens), skip_special_tokens=True)
            theirs = ours[(s.task, s.length, s.index)]
            # eval's generate stops at EOS; compare the answer (first line) only
            agree = text.strip().splitlines()[0] == theirs.strip().splitlines()[0]
            same, total = same + agree, total + 1
            print(f"{s.task}@{length} #{s.index}: simulation {text.strip()[:30]!r}, kivi2 {theirs.strip()[:30]!r}")
    print(f"\nthe same answer on {same} of {total} prompts")


if __name__ == "__main__":
    main()
