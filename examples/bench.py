"""Decode speed and memory of kvsurgery recipes against HF's full cache (the `kvsurgery bench` command).

    python examples/bench.py                       # GPU: Llama-3.1-8B shape, 16K/64K, batch 1 and 16
    python examples/bench.py --contexts 16K --batch 1 --recipes full,snapkv
Without CUDA it runs a seconds-long smoke run on a tiny shape (CPU numbers say nothing about GPU speed).
"""

import argparse
import sys

import torch

from kvsurgery.bench import decode as bench

CPU_SMOKE = ["--shape", "tiny", "--device", "cpu", "--contexts", "256", "--batch", "1", "--budget", "0.2"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    if not torch.cuda.is_available() and not argv:
        print("no CUDA device: running the CPU smoke configuration", " ".join(CPU_SMOKE))
        argv = CPU_SMOKE
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
