"""Are a recipe's answers on SmolLM2 the method's or a bug? Re-run its eval prompts with an independent simulation.

    python examples/simulation_check.py RESULTS_JSON --recipe RECIPE [--budget 0.2] [--prefixkv FILE] [--n 3]

RESULTS_JSON is a `kvsurgery eval` results.json holding the recipe's records. RECIPE is one of kivi2, quant1bit,
quant2bit, prefixkv, or snapkv+ one of the three quantizers. The simulation shares no code with kvsurgery's
passes, ops or kernels: it runs transformers' own DynamicCache with a plain float32 attention function that
follows the methods as docs/quant.md, docs/prefixkv.md and the SnapKV and KIVI papers describe them:

- prefill attention is exact; SnapKV and PrefixKV scores are computed from its probabilities;
- after prefill the cache is cut to the kept tokens and its quantized span is replaced by fake-quantized values;
- decode attention reads that cache, with CalibQuant's logit calibration on the quantized span and PrefixKV's
  anchor deletion.

Equal answers mean kvsurgery and the simulation implement the same method. `--keep-first N` leaves the first N
prompt tokens unquantized, the text-model analogue of CalibQuant's 16-bit system prompt (a what-if, not a check).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

from kvsurgery.compat import cache_keyword
from kvsurgery.eval import tasks
from kvsurgery.eval.tasks import score
from kvsurgery.models import load_model


@dataclass
class Quantizer:
    """Min-max asymmetric fake quantization, x -> s * (code - z), over one axis of a [B, Hkv, S, d] tensor."""

    bits: int
    k_axis: str  # "channel": ranges over tokens; "token": ranges over channels
    v_axis: str
    group: int  # tokens (channel axis) or channels (token axis) per range; 0 = the whole span
    shrink_k: float = 1.0
    shrink_v: float = 1.0
    squeeze: float = 0.0  # CalibQuant: the span's logits are mapped from [mn, mx] to [mn, mx - squeeze]
    recent: int = 0  # newest kept prompt tokens left in full precision
    flush: bool = False  # KIVI: while decoding, the oldest `group` dense tokens are quantized when `recent` are dense

    def fake(self, x: torch.Tensor, axis: str, shrink: float) -> torch.Tensor:
        b, h, s, d = x.shape
        if axis == "channel":
            g = self.group or s
            xs = x.reshape(b, h, s // g, g, d)
            dim = 3
        else:
            g = self.group or d
            xs = x.reshape(b, h, s, d // g, g)
            dim = 4
        levels = 2**self.bits - 1
        lo, hi = xs.amin(dim, keepdim=True) * shrink, xs.amax(dim, keepdim=True) * shrink
        scale = ((hi - lo) / levels).clamp_min(1e-8)
        zero = -lo / scale
        code = (xs / scale + zero).clamp(0, levels).round()
        return (scale * (code - zero)).reshape(b, h, s, d)


QUANTIZERS = {
    "kivi2": Quantizer(2, "channel", "token", 32, recent=128, flush=True),
    "quant1bit": Quantizer(1, "channel", "channel", 0, shrink_k=0.5, shrink_v=0.3, squeeze=3.0, recent=32),
    "quant2bit": Quantizer(2, "channel", "channel", 0, squeeze=3.0, recent=32),
}


@dataclass
class Simulation:
    """One prompt's state: per-layer prefill statistics, the kept tokens and the quantized span."""

    recipe: str
    budget: float
    ratios: list[float] | None = None  # prefixkv: per-layer evicted fraction
    keep_first: int = 0
    cache: DynamicCache = field(default_factory=DynamicCache)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    span: dict[int, tuple[int, int]] = field(default_factory=dict)  # per layer: [start, end) of quantized tokens
    prompt_len: int = 0
    kept: dict[int, int] = field(default_factory=dict)  # prefixkv: tokens kept at prefill per layer
    step: int = 0

    @property
    def quantizer(self) -> Quantizer | None:
        return QUANTIZERS.get(self.recipe.split("+")[-1])

    def attention(self, module, query, key, value, attention_mask, scaling=None, **_):
        """Exact float32 attention; records prefill scores, applies the decode-time rules."""
        layer = module.layer_idx
        rep = query.shape[1] // key.shape[1]
        if query.shape[2] == 1 and self.recipe == "prefixkv":
            key, value = self.anchor_delete(layer, key, value)
        if query.shape[2] == 1 and self.quantizer and self.quantizer.flush:
            self.flush(layer, key, value)
        k, v = key.repeat_interleave(rep, 1).float(), value.repeat_interleave(rep, 1).float()
        logits = query.float() @ k.transpose(-1, -2) * scaling
        t = query.shape[2]
        if t > 1:
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            logits = logits.masked_fill(~causal, -math.inf)
        elif self.quantizer and self.quantizer.squeeze:
            a, b = self.span[layer]
            part = logits[..., a:b]
            mn, mx = part.amin(-1, keepdim=True), part.amax(-1, keepdim=True)
            logits[..., a:b] = (part - mn) / (mx - mn + 1e-8) * (mx - self.quantizer.squeeze - mn) + mn
        probs = logits.softmax(-1)
        if t > 1:
            self.record(layer, probs, rep)
        return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None

    def record(self, layer: int, probs: torch.Tensor, rep: int) -> None:
        """SnapKV: window-32 scores, avg-pooled (5), averaged per KV head. PrefixKV: attention received, summed
        over all queries and averaged over all heads."""
        if self.recipe.startswith("snapkv"):
            w = 32
            s = probs[0, :, -w:, :-w].mean(1)  # [H, T - W]
            s = F.avg_pool1d(s[:, None], 5, stride=1, padding=2)[:, 0]
            self.scores[layer] = s.reshape(-1, rep, s.shape[-1]).mean(1)
        elif self.recipe == "prefixkv":
            self.scores[layer] = probs[0].mean(0).sum(0)  # [T]

    def compress(self) -> None:
        """After prefill: cut each layer to its kept tokens (position order), then fake-quantize the span."""
        t = self.prompt_len
        for layer, cache in enumerate(self.cache.layers):
            if self.recipe.startswith("snapkv"):
                n_keep = math.ceil(t * self.budget) - 32  # kvsurgery budgets round up
                top = self.scores[layer].topk(n_keep, dim=-1).indices.sort(-1).values  # [Hkv, n_keep]
                idx = torch.cat([top, torch.arange(t - 32, t).expand(top.shape[0], -1)], -1)
                gather = idx[None, :, :, None].expand(1, -1, -1, cache.keys.shape[-1])
                cache.keys, cache.values = cache.keys.gather(2, gather), cache.values.gather(2, gather)
            elif self.recipe == "prefixkv":
                drop = round(self.ratios[layer] * t)
                middle = self.scores[layer][1 : t - 1]
                keep_mid = middle.argsort(stable=True)[drop:] + 1
                idx = torch.cat([torch.tensor([0]), keep_mid, torch.tensor([t - 1])]).sort().values
                cache.keys, cache.values = cache.keys[:, :, idx], cache.values[:, :, idx]
                self.kept[layer] = len(idx)
        q = self.quantizer
        if q is None:
            return
        n = self.cache.layers[0].keys.shape[2]
        end = n - q.recent
        if q.flush:  # KIVI: whole groups of keys, at most `recent` tokens left in full precision
            end = -(-end // q.group) * q.group
        a = self.keep_first
        for layer, cache in enumerate(self.cache.layers):
            self.span[layer] = (a, max(a, end))
            self.quantize(cache.keys, cache.values, a, end)

    def quantize(self, keys: torch.Tensor, values: torch.Tensor, a: int, b: int) -> None:
        """Replace tokens [a, b) of one layer's cache by their fake-quantized values, in place."""
        q = self.quantizer
        if b > a:
            keys[:, :, a:b] = q.fake(keys[:, :, a:b].float(), q.k_axis, q.shrink_k)
            values[:, :, a:b] = q.fake(values[:, :, a:b].float(), q.v_axis, q.shrink_v)

    def flush(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """KIVI decode (kvsurgery's documented schedule): when `recent` tokens were dense before the new one arrived,
        quantize the oldest `group` of them as one group (`key`/`value` are the cache's own tensors)."""
        q, (a, end) = self.quantizer, self.span[layer]
        if key.shape[2] - 1 - end >= q.recent:
            self.quantize(key, value, end, end + q.group)
            self.span[layer] = (a, end + q.group)

    def anchor_delete(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """PrefixKV decode: with n tokens seen (the new one included), delete the token at index keep - 25 when the
        layer holds more than n * (1 - ratio)."""
        n = self.prompt_len + self.step + 1
        if int(key.shape[2] - n * (1 - self.ratios[layer])) > 0:
            anchor = self.kept[layer] - 25
            anchor = anchor if anchor >= 1 else self.kept[layer] // 2
            i = min(anchor, key.shape[2] - 1)
            key = torch.cat([key[:, :, :i], key[:, :, i + 1 :]], 2)
            value = torch.cat([value[:, :, :i], value[:, :, i + 1 :]], 2)
            self.cache.layers[layer].keys, self.cache.layers[layer].values = key, value
        return key, value


ACTIVE: list[Simulation] = []
AttentionInterface.register("kvsim", lambda *a, **kw: ACTIVE[0].attention(*a, **kw))


@torch.no_grad()
def simulate(model, sim: Simulation, ids: torch.Tensor, new_tokens: int, eos: int | None) -> torch.Tensor:
    """Greedy decoding on the simulated cache, up to `new_tokens` or the end-of-sequence token (as generate)."""
    ACTIVE[:] = [sim]
    sim.prompt_len = ids.shape[1]
    keyword = cache_keyword(model)
    logits = model(ids, use_cache=True, **{keyword: sim.cache}).logits
    sim.compress()
    out = [logits[:, -1].argmax(-1, keepdim=True)]
    for step in range(new_tokens - 1):
        if out[-1].item() == eos:
            break
        sim.step = step
        pos = torch.tensor([[sim.prompt_len + step]])
        logits = model(out[-1], position_ids=pos, use_cache=True, **{keyword: sim.cache}).logits
        out.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(out, 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a kvsurgery eval results.json with the recipe's records")
    parser.add_argument("--recipe", required=True, help="kivi2, quant1bit, quant2bit, prefixkv, snapkv+QUANT")
    parser.add_argument("--record", help="the recipe's name in the records (default: --recipe)")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--prefixkv", help="prefixkv calibration JSON (its per-layer ratios for --budget)")
    parser.add_argument("--tasks", default="passkey,niah_single")
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--keep-first", type=int, default=0, help="what-if: first N prompt tokens unquantized")
    args = parser.parse_args()
    if args.keep_first and args.recipe.endswith("kivi2"):
        parser.error("--keep-first applies to quant1bit and quant2bit (KIVI's groups start at the first token)")

    name = args.record or args.recipe
    records = json.load(open(args.results))["records"]
    ours = {
        (r["task"], r["length"], r["index"]): r
        for r in records
        if r["recipe"] == name and r["budget"] in (None, args.budget)
    }
    if not ours:
        raise SystemExit(f"{args.results} has no records of {name!r} at budget {args.budget}")
    ratios = None
    if args.recipe == "prefixkv":
        table = json.load(open(args.prefixkv))["data"]["ratios"]
        ratios = next(v for k, v in table.items() if abs(float(k) - args.budget) < 1e-9)

    model, tokenizer = load_model("smollm2-135m")
    model.set_attn_implementation("kvsim")
    same = total = right = 0
    for task in args.tasks.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            for s in tasks.generate(tokenizer, task, length, n=args.n, seed=0):
                rec = ours.get((s.task, s.length, s.index))
                if rec is None:
                    continue
                sim = Simulation(args.recipe, args.budget, ratios, args.keep_first)
                ids = tokenizer(s.prompt, return_tensors="pt").input_ids
                new = simulate(model, sim, ids, s.max_new_tokens, tokenizer.eos_token_id)
                text = tokenizer.decode(new, skip_special_tokens=True)
                first = text.strip().splitlines()[0] if text.strip() else ""
                theirs = rec["prediction"].strip().splitlines()[0] if rec["prediction"].strip() else ""
                agree = first == theirs  # eval's generate stops at EOS; compare the answer's first line
                same, total = same + agree, total + 1
                right += score(s.scoring, text, s.answers) == 1.0
                print(
                    f"{task}@{length} #{s.index}: simulation {first[:40]!r}  kvsurgery {theirs[:40]!r}  "
                    f"{'same' if agree else 'DIFFERENT'}",
                    flush=True,
                )
    print(f"\n{name}: the same answer on {same} of {total} prompts; the simulation answers {right} of {total}")


if __name__ == "__main__":
    main()
