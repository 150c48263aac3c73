"""Every kvsurgery custom op (`torch.ops.kvsurgery.*`), declared in the modules below and registered by `register()`.

`kvsurgery/__init__.py` calls `register()` once; it defines each op (schema, fake, CPU implementation: the PyTorch
reference) and installs the Triton kernels as the CUDA implementations (`kvsurgery.kernels.CUDA_KERNELS`).
"""

from __future__ import annotations

import torch

from kvsurgery import kernels
from kvsurgery.ops import adakv, core, csp, doublesparse, h2o, prefixkv, quant, snapkv, streaming
from kvsurgery.ops.schema import OpDef, define, register_cuda

MODULES = (core, snapkv, h2o, streaming, adakv, quant, prefixkv, doublesparse, csp)  # core first, then one per method
OPS: dict[str, OpDef] = {op.name: op for module in MODULES for op in module.OPS}


def register() -> None:
    """Define every op and its CUDA kernels with torch.library, once per process (a re-imported kvsurgery finds
    them defined and leaves them)."""
    if hasattr(torch.ops.kvsurgery, "kv_update"):
        return
    for op in OPS.values():
        define(op)
    for name, kernel in kernels.CUDA_KERNELS.items():
        register_cuda(OPS[name], kernel)
