"""The CPU packed-region kernel alone (`kvsurgery/kernels/cpu_packed_attention.cpp`), called through ctypes, built for
AVX-512 (16 lanes), AVX2 (8 lanes) and without vector flags (4 lanes): 3 KV heads x 3900 packed slots of KIVI-2
(SmolLM2-135M at a 4K prompt), one thread, median of 300 calls. A build this CPU cannot run is skipped.

  python results/2026-12-03-cpu-smollm2/kivi-kernel/kernel_alone.py
"""

import time

import torch

from kvsurgery.kernels import cpu_packed_attention as kernel

B, N_KV, G, D, PACKED = 1, 3, 3, 64, 3968
BUILDS = {"AVX512": kernel._ISA_FLAGS["AVX512"], "AVX2": kernel._ISA_FLAGS["AVX2"], "none": ([], 4)}
RUNS = {"AVX512": {"AVX512"}, "AVX2": {"AVX512", "AVX2"}}  # the capabilities that can run a build


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = N_KV * PACKED
    tensors = [
        torch.randn(B, N_KV * G, D, generator=g),
        torch.randint(0, 256, (B, rows, 16), dtype=torch.uint8, generator=g),
        torch.rand(B, rows // 32, D, generator=g),
        torch.randn(B, rows // 32, D, generator=g),
        torch.randint(0, 256, (B, rows, 16), dtype=torch.uint8, generator=g),
        torch.rand(B, rows, D // 32, generator=g),
        torch.randn(B, rows, D // 32, generator=g),
        (torch.arange(N_KV, dtype=torch.int32) * PACKED)[None].contiguous(),
        torch.full((B, N_KV), 3900, dtype=torch.int32),
        torch.empty(B, N_KV * G, D),
        torch.empty(B, N_KV * G),
    ]
    capability = torch.backends.cpu.get_cpu_capability()
    for name, (flags, lanes) in BUILDS.items():
        if capability not in RUNS.get(name, {capability}):
            print(f"{name}: skipped (this CPU: {capability})")
            continue
        fn = kernel.build(G, D, 2, 2, 32, 32, flags, lanes)
        call = [t.data_ptr() for t in tensors] + [B, N_KV, rows, 0.125, 1]
        times = []
        for _ in range(300):
            t0 = time.perf_counter()
            fn(*call)
            times.append(time.perf_counter() - t0)
        print(f"{name} ({lanes} lanes): median {sorted(times)[150] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
