"""Ops of the quantized store (`torch.ops.kvsurgery.*_quantized*`), backed by `kvsurgery.reference.quant`, and the
CPU kernel of the packed region's decode attention (`attend_packed`) that the CPU lowering calls.

They take the core store tensors (the dense, full-precision region), then the packed region's (`QUANT_TENSORS`);
the layout travels as `QuantLayout.text()`.
"""

from __future__ import annotations

import torch

from kvsurgery.kernels import cpu_packed_attention
from kvsurgery.ops.schema import OpDef, like_q
from kvsurgery.reference import quant as quant_reference
from kvsurgery.store import CORE_TENSORS, QUANT_TENSORS

STORE = (*CORE_TENSORS, *QUANT_TENSORS)
# what decode attention reads: the dense region's k/v/pos and tables, the packed planes and their starts/lengths
READ = ("k_store", "v_store", "pos", "start", "length", "seen", *QUANT_TENSORS[:7], "q_len")
# what a KIVI flush writes: the residual moved forward, the packed planes it fills and their lengths
FLUSHED = ("k_store", "v_store", "pos", "length", *QUANT_TENSORS[:6], "q_len")


def _packed_outputs(q: torch.Tensor, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_packed`'s output [B, Hq, D] and log-sum-exp [B, Hq], float32."""
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:2], dtype=torch.float32)


OPS = (
    # Prefill: keep what the unquantized store keeps; pack the layout's share, the rest stays full precision.
    OpDef(
        "select_quantized_",
        (
            *STORE,
            "Tensor k",
            "Tensor v",
            "Tensor? scores",
            "Tensor? budgets",
            "Tensor? mask",
            "Tensor? quantize_first",
            "int sinks",
            "int window",
            "str layout",
        ),
        quant_reference.select_quantized_,
        writes=STORE,
    ),
    # Decode: flush full KIVI residuals into the packed region, then append the new token in full precision.
    OpDef(
        "append_quantized_",
        (*STORE, "Tensor k", "Tensor v", "str layout"),
        quant_reference.append_quantized_,
        writes=STORE,
    ),
    # Decode, the flush alone (what a CPU graph calls before its lowered append, so that quantization runs only on
    # the steps that flush: a graph has no branch; `kvsurgery.compiler.cpu_lowering`).
    OpDef("flush_quantized_", (*STORE, "str layout"), quant_reference.flush_quantized_, writes=FLUSHED),
    # Decode attention over the packed (dequantized, logit-squeezed) and full-precision tokens -> [B, Hq, 1, D].
    OpDef(
        "attend_quantized",
        ("Tensor q", *READ, "float scale", "str layout", "float squeeze"),
        quant_reference.attend_quantized,
        like_q,
        "Tensor",
    ),
    # Decode attention over the packed region alone, in C++ on CPU -> (output [B, Hq, D], log-sum-exp [B, Hq]): what
    # the CPU lowering of `attend_quantized` calls for KIVI layouts, merging the dense region in aten ops.
    OpDef(
        "attend_packed",
        ("Tensor q", *QUANT_TENSORS[:7], "q_len", "float scale", "str layout"),
        cpu_packed_attention.attend_packed,
        _packed_outputs,
        "(Tensor, Tensor)",
    ),
)
