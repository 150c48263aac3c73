"""Interleaved side by side, real SmolLM2-135M, 4K prompt, compile, one thread: one model instance per engine, every
round times each once (24 new tokens, median of steps 5-23), so slow drifts of a shared VM hit every engine alike.

Usage: python interleaved.py hf,full,kivi2 3 OUT.json (run as /tmp/s19/cmp3.py on 2026-12-03; reformatted for ruff).
"""

import json
import statistics
import sys
import time

import torch

import kvsurgery
from kvsurgery.bench.decode import real_model, timed_generate


def main(engines: list[str], rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    models = {}
    for e in engines:
        m = real_model("smollm2-135m", torch.device("cpu"), torch.float32)
        if e != "hf":
            kvsurgery.apply(m, e, None, compile=True)
        t0 = time.perf_counter()
        timed_generate(m, torch.randint(3, m.config.vocab_size, (1, 4096), generator=gen), 24)
        print(f"{e}: warm-up (compile) {time.perf_counter() - t0:.0f} s", flush=True)
        models[e] = m
    ids = torch.randint(3, 49152, (1, 4096), generator=gen)
    times: dict[str, list[float]] = {e: [] for e in engines}
    for r in range(rounds):
        for e, m in models.items():
            times[e].append(statistics.median(timed_generate(m, ids, 24)[1][4:]))
        print(f"round {r}: " + ", ".join(f"{e} {times[e][-1]:.1f}" for e in engines), flush=True)
    print("median ms/token:", {e: round(statistics.median(v), 1) for e, v in times.items()})
    ratios = {e: statistics.median(h / x for h, x in zip(times["hf"], times[e], strict=True)) for e in engines}
    print("vs hf (median of per-round ratios):", {e: round(v, 2) for e, v in ratios.items()})
    with open(out, "w") as f:
        json.dump({"engines": engines, "ms_per_token_by_round": times, "command": " ".join(sys.argv)}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3])
