"""Compile time of `apply(recipe, compile=True)` on the real SmolLM2-135M truncated to N layers: the first greedy
`generate()` (1K prompt, 40 new tokens; it compiles prefill and decode) minus the second (compiled), one thread.

  TORCHINDUCTOR_FX_GRAPH_CACHE=0 python results/2026-12-03-cpu-smollm2/kivi-kernel/compile_time.py kivi2 4
"""

import sys
import time

import torch

import kvsurgery
from kvsurgery.models import load_model


def main(recipe: str, layers: int) -> None:
    torch.set_num_threads(1)
    model, _ = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    kvsurgery.apply(model, recipe, compile=True)
    ids = torch.randint(100, 10000, (1, 1024), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
            times.append(time.perf_counter() - t0)
    first, second = times
    print(f"{recipe}, {layers} layers: first {first:.1f} s, second {second:.1f} s, compile {first - second:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
