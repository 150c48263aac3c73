"""One layer's lowered KIVI attention (`attend_quantized`, per head) at SmolLM2-135M's 4K shape, compiled alone in
one process: the lowering before the C++ kernel (aten ops dequantizing into a copy, commit 661736b) and after.

Run from the repository root of a checkout with its git history:
  MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456 TORCHINDUCTOR_FX_GRAPH_CACHE=0 \\
    python results/2026-12-03-cpu-smollm2/kivi-kernel/layer_attention.py
"""

import importlib.util
import pathlib
import subprocess
import sys
import tempfile
import time

import torch
from kvsurgery.passes.kivi import KIVI2, _layout

import kvsurgery  # noqa: F401  (registers the ops)
from kvsurgery.compiler import cpu_lowering

B, N_KV, G, D = 1, 3, 3, 64  # SmolLM2-135M: 3 KV heads, 9 query heads, head dim 64
PACKED, DENSE, WIDTH = 3968, 160, 16  # slots per head at a 4K prompt; bytes of a 2-bit key


def old_lowering():
    """cpu_lowering as of 661736b (dequantization into a copy)."""
    source = subprocess.run(
        ["git", "show", "661736b:kvsurgery/compiler/cpu_lowering.py"], capture_output=True, text=True, check=True
    ).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "lowering_661736b.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lowering_661736b", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Dynamo imports a traced function's module by name
    spec.loader.exec_module(module)
    return module


def inputs() -> tuple:
    g = torch.Generator().manual_seed(0)
    rows = N_KV * PACKED
    return (
        torch.randn(B, N_KV * G, 1, D, generator=g),
        torch.randn(B, N_KV * DENSE, D, generator=g),
        torch.randn(B, N_KV * DENSE, D, generator=g),
        torch.arange(N_KV * DENSE)[None].clone(),
        (torch.arange(N_KV) * DENSE)[None].int(),
        torch.full((B, N_KV), 130).int(),
        torch.full((B, 1), 4000),
        torch.randint(0, 256, (B, rows, WIDTH), dtype=torch.uint8, generator=g),
        torch.rand(B, rows // 32, D, generator=g) * 0.1,
        torch.randn(B, rows // 32, D, generator=g),
        torch.randint(0, 256, (B, rows, WIDTH), dtype=torch.uint8, generator=g),
        torch.rand(B, rows, D // 32, generator=g) * 0.1,
        torch.randn(B, rows, D // 32, generator=g),
        (torch.arange(N_KV) * PACKED)[None].int(),
        torch.full((B, N_KV), 3900).int(),
        0.125,
        _layout(KIVI2.Options(bits=2)).text(),
        0.0,
    )


def main() -> None:
    torch.set_num_threads(1)
    args = inputs()
    want = torch.ops.kvsurgery.attend_quantized(*args)
    compiled = {}
    for name, module in (("aten copy (661736b)", old_lowering()), ("C++ kernel", cpu_lowering)):
        fn = torch.compile(lambda *a, m=module: m.attend_quantized(*a, uniform_heads=True), dynamic=False)
        for t in args[7:13]:  # the packed planes: their slot axis is symbolic, as in the model's graph
            torch._dynamo.mark_dynamic(t, 1)
        print(f"{name}: max |lowered - reference| {(fn(*args) - want).abs().max().item():.2e}")
        compiled[name] = fn
    for round_ in range(3):
        for name, fn in compiled.items():
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - t0)
            print(f"round {round_} {name}: median {sorted(times)[100] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
