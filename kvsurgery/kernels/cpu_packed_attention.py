"""Decode attention over a quantized store's packed (KIVI) region on CPU, in C++ (`cpu_packed_attention.cpp`).

The codes are dequantized inside the logit and value loops, a vector of slots or channels at a time, so no
dequantized copy of the keys or values is written. Inductor cannot generate these loops: written as aten ops, the
dequantization either writes a float copy that two matmuls then read (1 MB a KV head for K and as much for V at
SmolLM2-135M's 4K shape), or, put inside the reductions, becomes kernels that redo the unpacking for every query
head and plane (docs/kernels.md, "The CPU kernel", has the measurements).
It returns each query head's log-sum-exp beside its output, so that the CPU lowering merges the full-precision
region in aten ops (`kvsurgery.compiler.cpu_lowering`).

Built on first use for each layout with the C++ compiler Inductor's CPU code needs anyway, for the CPU's vector
instruction set, and kept in the kvsurgery cache (`KVSURGERY_CACHE`, default ~/.cache/kvsurgery).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile
import warnings

import torch
from torch import Tensor

from kvsurgery.errors import KVSurgeryError
from kvsurgery.models import cache_dir
from kvsurgery.reference.quant_layout import QuantLayout

SOURCE = pathlib.Path(__file__).with_suffix(".cpp")
_ISA_FLAGS = {  # torch's CPU capability -> (compiler flags, floats per vector register)
    "AVX512": (["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma"], 16),
    "AVX2": (["-mavx2", "-mfma"], 8),
}


def supported(layout: QuantLayout, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel serves this layout: keys per channel over groups of slots, values per slot over groups of
    channels (KIVI's), computed in float32 (float32, bfloat16 and float16 models)."""
    k, v = layout.k, layout.v
    return (
        dtype in (torch.float32, torch.bfloat16, torch.float16)
        and k.axis == "channel"
        and k.group > 0
        and v.axis == "token"
        and head_dim % v.group == 0
        and all(8 % s.bits == 0 and head_dim * s.bits % 8 == 0 for s in (k, v))
    )


def attend_packed(
    q: Tensor,
    qk_codes: Tensor,
    qk_scale: Tensor,
    qk_low: Tensor,
    qv_codes: Tensor,
    qv_scale: Tensor,
    qv_low: Tensor,
    q_start: Tensor,
    q_len: Tensor,
    scale: float,
    layout: str,
) -> tuple[Tensor, Tensor]:
    """Queries q [B, Hq, D] over each KV head's `q_len` packed slots from `q_start` -> (output [B, Hq, D], log-sum-exp
    [B, Hq]) in float32; a head without packed slots gets zeros and -inf."""
    lay = _parsed(layout)
    b, hq, d = q.shape
    n_kv = q_start.shape[1]
    slots = qk_codes.shape[1]
    if slots % lay.k.group or qk_scale.shape[1] * lay.k.group != slots:
        raise KVSurgeryError(f"internal: {slots} packed slots do not make whole key groups of {lay.k.group}")
    out = q.new_empty((b, hq, d), dtype=torch.float32)
    lse = q.new_empty((b, hq), dtype=torch.float32)
    run = _kernel(hq // n_kv, d, lay.k.bits, lay.v.bits, lay.k.group, lay.v.group)
    tensors = (
        q.float().contiguous(),
        qk_codes.contiguous(),
        *(t.float().contiguous() for t in (qk_scale, qk_low)),
        qv_codes.contiguous(),
        *(t.float().contiguous() for t in (qv_scale, qv_low)),
        *(t.to(torch.int32).contiguous() for t in (q_start, q_len)),
        out,
        lse,
    )
    run(*(t.data_ptr() for t in tensors), b, n_kv, slots, scale, torch.get_num_threads())
    return out, lse


_parsed = functools.cache(QuantLayout.parse)  # every decode step of every layer passes the same text


@functools.cache
def _kernel(g: int, d: int, k_bits: int, v_bits: int, k_group: int, v_group: int) -> ctypes._CFuncPtr:
    """The compiled kernel for one layout, for this CPU's vector instructions (built, or found in the cache)."""
    flags, width = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ([], 4))
    return build(g, d, k_bits, v_bits, k_group, v_group, flags, _lanes(width, k_group, d * v_bits // 8))


def build(g: int, d: int, k_bits: int, v_bits: int, k_group: int, v_group: int, flags: list[str], lanes: int):
    """The kernel for one layout built with `flags` and vectors of `lanes` floats (which must divide the key group
    and the bytes of a value), as a ctypes function."""
    defines = dict(KV_G=g, KV_D=d, KV_L=lanes, KV_KB=k_bits, KV_VB=v_bits, KV_GK=k_group, KV_GV=v_group)
    args = ["-O3", "-std=c++17", "-fPIC", "-shared", *flags, *(f"-D{k}={v}" for k, v in defines.items())]
    try:
        library = _built([*args, "-fopenmp"])
    except KVSurgeryError as with_openmp:  # e.g. Apple's clang, which has no -fopenmp
        try:
            library = _built(args)
        except KVSurgeryError:
            raise with_openmp from None
        warnings.warn("the CPU KIVI attention kernel was built without OpenMP, so it runs on one thread", stacklevel=2)
    fn = ctypes.CDLL(str(library)).kernel
    fn.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_int64]
    fn.restype = None
    return fn


def _lanes(width: int, *multiples: int) -> int:
    """The widest vector (a power of two up to `width` floats) that divides every one of `multiples`."""
    lanes = width
    while any(m % lanes for m in multiples):
        lanes //= 2
    return lanes


def _built(args: list[str]) -> pathlib.Path:
    """The shared library of SOURCE compiled with `args`, from the cache or compiled into it."""
    found = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    compiler = shlex.split(os.environ["CXX"]) if os.environ.get("CXX") else [found] if found else None
    if not compiler:
        raise KVSurgeryError(
            "KIVI attention on CPU with compile=True builds a small C++ kernel, and no C++ compiler was found "
            "(Inductor's CPU code needs one too): install g++ or set CXX"
        )
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *compiler, *args]).encode()).hexdigest()[:20]
    target = cache_dir() / "cpu_kernels" / f"packed_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        command = [*compiler, *args, str(SOURCE), "-o", str(built)]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
            message = done.stderr[-2000:] if done.returncode else ""
        except OSError as e:  # the compiler named by CXX is not there
            message = str(e)
        if message or not built.exists():
            raise KVSurgeryError(f"building the CPU KIVI attention kernel failed ({shlex.join(command)}):\n{message}")
        os.replace(built, target)  # atomic: a parallel process finds the whole library or none
    return target
