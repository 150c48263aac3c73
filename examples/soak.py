"""Memory soak: apply a recipe many times in one process and print the resident memory after every cycle.

Two loops, as a long-lived process (eval sweep, notebook, server) runs them:
  copy     m = kvsurgery.apply(copy.deepcopy(base), recipe); m.generate(...); del m
  restore  kvsurgery.apply(base, recipe); base.generate(...); kvsurgery.restore(base)
RSS is read after gc.collect(); "alive" counts the cycles' models and stores still reachable (via weakrefs).
With nothing retained RSS stays flat after the first cycles (allocator and compile caches warm up once).

    python examples/soak.py                                   # tiny Llama (hidden 512, 4 layers), snapkv budget 64
    python examples/soak.py --compile --copy 4 --restore 4
    python examples/soak.py --model smollm2-135m --copy 20 --restore 0 --out soak.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import weakref

import torch

import kvsurgery
from kvsurgery.testing import resident_mib, tiny_model


def load(name: str) -> torch.nn.Module:
    if name == "tiny":
        # hidden 512, 4 layers, 8000-token vocabulary: 67 MiB of fp32 weights
        return tiny_model("llama", layers=4, heads=8, kv_heads=4, head_dim=64, vocab=8000)
    from kvsurgery.models import load_model

    return load_model(name)[0]


def generate(model: torch.nn.Module, ids: torch.Tensor, new: int) -> None:
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)


def soak(base, mode: str, cycles: int, args, ids: torch.Tensor) -> list[dict]:
    """Run `cycles` of one loop; one row per cycle: RSS, its change and the retained models/stores."""
    refs: list[weakref.ref] = []
    rows = []
    last = resident_mib()
    for cycle in range(1, cycles + 1):
        start = time.perf_counter()
        model = copy.deepcopy(base) if mode == "copy" else base
        kvsurgery.apply(model, args.recipe, budget=args.budget, compile=args.compile, max_new_tokens=args.new)
        generate(model, ids, args.new)
        refs.append(weakref.ref(model._kvsurgery.last_store))
        if mode == "copy":
            refs.append(weakref.ref(model))
            del model
        else:
            kvsurgery.restore(model)
            del model
        now = resident_mib()
        alive = sum(r() is not None for r in refs)
        rows.append(
            {
                "mode": mode,
                "cycle": cycle,
                "rss_mib": round(now, 1),
                "delta_mib": round(now - last, 1),
                "alive": alive,
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
        print(f"{mode:8} {cycle:5} {now:9.1f} {now - last:+8.1f} {alive:6} {rows[-1]['seconds']:8.2f}", flush=True)
        last = now
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random Llama) or a kvsurgery.models name")
    parser.add_argument("--recipe", default="snapkv")
    parser.add_argument("--budget", type=float, default=64, help="tokens per KV head (>= 1) or a prompt fraction")
    parser.add_argument("--copy", type=int, default=8, help="cycles of apply to a deepcopy / generate / del")
    parser.add_argument("--restore", type=int, default=6, help="cycles of apply / generate / restore on one model")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=8, help="generated tokens per cycle")
    parser.add_argument("--compile", action="store_true", help="apply with compile=True (Inductor)")
    parser.add_argument("--out", help="write the rows and settings as JSON here")
    args = parser.parse_args()
    if args.budget >= 1:
        args.budget = int(args.budget)

    torch.manual_seed(0)
    base = load(args.model)
    vocab = base.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt))
    start = resident_mib()
    print(
        f"{args.model}: {sum(p.numel() for p in base.parameters()) * 4 / 2**20:.0f} MiB of fp32 weights; "
        f"RSS at start {start:.1f} MiB; torch {torch.__version__}"
    )
    print(f"{'mode':8} {'cycle':>5} {'rss MiB':>9} {'delta':>8} {'alive':>6} {'seconds':>8}")
    rows = soak(base, "copy", args.copy, args, ids) + soak(base, "restore", args.restore, args, ids)
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        with open(args.out, "w") as f:
            json.dump(
                {"settings": settings, "torch": torch.__version__, "start_rss_mib": round(start, 1), "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
