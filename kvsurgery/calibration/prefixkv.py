"""PrefixKV per-layer retention ratios by binary search of a global prefix configuration (docs/prefixkv.md).

    kvsurgery calibrate prefixkv --model smollm2-135m --out prefixkv.json            # budgets 0.1 ... 0.9

Per calibration prompt, each layer's importance (attention received, summed over prompt queries, averaged over
heads) is sorted into a cumulative distribution; one cumulative-importance level p, shared by every layer, is
found by binary search so that the tokens the layers drop add up to the target, and each layer's eviction ratio
follows. Ratios are averaged over the prompts per layer (the reference code's aggregation step is not published:
the mean is our [UNV] choice). Budgets are retained fractions (the paper's unit); the code's eviction ratio is
1 - budget.
"""

from __future__ import annotations

import argparse
import pathlib

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvsurgery.calibration.artefact import Artefact, ModelIdentity, save
from kvsurgery.calibration.attention_probe import eager_attention, record_attention
from kvsurgery.calibration.haystack import calibration_prompts
from kvsurgery.errors import CalibrationError

METHOD = "prefixkv"
DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TOLERANCE = 5  # tokens: the search stops when |total dropped - target| < 5, as the reference code
MAX_STEPS = 64  # bisection steps (the level p is then resolved to float precision)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="packaged model name (smollm2-135m) or a local HF folder")
    parser.add_argument("--out", required=True, help="artefact path (.json)")
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS), help="retained fractions in (0, 1]"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024], help="calibration prompt lengths")
    parser.add_argument("--samples", type=int, default=8, help="prompts per length (default 8)")
    parser.add_argument("--sinks", type=int, default=1, help="first tokens always kept (default 1, as the paper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated calibration prompts")
    parser.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the tokenizer's chat template")


def calibrate(args: argparse.Namespace) -> pathlib.Path:
    from kvsurgery.models import load_model

    model, tokenizer = load_model(args.model, attn="eager")
    artefact = calibrate_model(
        model,
        tokenizer,
        budgets=args.budgets,
        lengths=args.lengths,
        samples=args.samples,
        sinks=args.sinks,
        seed=args.seed,
        chat=not args.no_chat,
    )
    return save(artefact, args.out)


def layer_cdfs(scores: list[Tensor]) -> list[Tensor]:
    """Per layer: scores sorted in decreasing order, normalised, accumulated (float64)."""
    out = []
    for s in scores:
        ordered = s.double().sort(descending=True).values
        out.append((ordered / ordered.sum()).cumsum(0))
    return out


def _drops(cdfs: list[Tensor], p: float, protect: int) -> list[int]:
    """Tokens each layer drops when it keeps the shortest prefix reaching cumulative importance p."""
    drops = []
    for cdf in cdfs:
        keep = int(torch.searchsorted(cdf, torch.tensor([p], dtype=cdf.dtype), right=False)) + 1
        drops.append(max(0, len(cdf) - keep - protect))
    return drops


def search_ratios(cdfs: list[Tensor], evict: float, protect: int) -> tuple[list[float], float]:
    """Per-layer eviction ratios for an overall eviction fraction `evict`, and the prefix level p found.

    Binary search of p in [0, 1] until the layers' drops total the target within TOLERANCE tokens; the drops are
    then rescaled to the target exactly and truncated to ints (the reference code), capped at what a layer can
    drop (its tokens minus the protected sinks and last token).
    """
    lengths = [len(cdf) for cdf in cdfs]
    target = evict * sum(lengths)
    lo, hi, p = 0.0, 1.0, 0.5
    for _ in range(MAX_STEPS):
        p = (lo + hi) / 2
        total = sum(_drops(cdfs, p, protect))
        if abs(total - target) < TOLERANCE:
            break
        if total < target:
            hi = p
        else:
            lo = p
    drops = _drops(cdfs, p, protect)
    total = sum(drops)
    scaled = [int(d * target / total) if total > 0 else 0 for d in drops]
    return [min(d, max(0, n - protect)) / n for d, n in zip(scaled, lengths, strict=True)], p


@torch.no_grad()
def layer_importance(model, ids: Tensor) -> list[Tensor]:
    """Each layer's accumulated attention [T] for one prompt: summed over queries, averaged over heads."""
    scores: dict[int, Tensor] = {}

    def sink(layer: int, probs: Tensor) -> None:
        scores[layer] = probs[0].double().mean(dim=0).sum(dim=0).cpu()

    with eager_attention(model), record_attention(model, sink):
        model(ids, use_cache=False)
    return [scores[layer] for layer in sorted(scores)]


def calibrate_model(
    model,
    tokenizer,
    budgets=DEFAULT_BUDGETS,
    lengths=(1024,),
    samples: int = 8,
    sinks: int = 1,
    seed: int = 0,
    chat: bool = True,
    progress: bool = True,
) -> Artefact:
    """Per-layer eviction ratios for each retained-fraction budget, averaged over generated calibration prompts."""
    budgets = [float(b) for b in budgets]
    if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
        raise CalibrationError(f"budgets are retained fractions in (0, 1], got {budgets}")
    if samples < 1 or sinks < 1 or not lengths or min(lengths) < sinks + 2:
        raise CalibrationError("prefixkv calibration needs samples >= 1, sinks >= 1 and lengths > sinks + 1")
    identity = ModelIdentity.of(model)
    prompts = calibration_prompts(tokenizer, identity.vocab_size, list(lengths), samples, seed, chat)
    device = next(model.parameters()).device
    per_budget: dict[float, list[list[float]]] = {b: [] for b in budgets}
    for ids in tqdm(prompts, desc="prefixkv calibration prompts", unit="prompt", disable=not progress):
        cdfs = layer_cdfs(layer_importance(model, torch.tensor([ids], device=device)))
        for b in budgets:
            per_budget[b].append(search_ratios(cdfs, 1.0 - b, sinks + 1)[0])
    data = {
        "unit": "ratios are per-layer evicted fractions; keys are retained-fraction budgets",
        "samples": len(prompts),
        "ratios": {
            repr(b): [round(float(r), 9) for r in torch.tensor(rows, dtype=torch.float64).mean(0)]
            for b, rows in per_budget.items()
        },
    }
    params = {"budgets": budgets, "lengths": list(lengths), "samples": samples, "sinks": sinks, "seed": seed}
    params["chat"] = chat and tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    return Artefact(METHOD, identity, params, data)
