"""The core ops: the `kv_update` marker and the store's select, append and attention (the methods' token scores
and budgets are their own stems: `ops/snapkv.py`, `ops/h2o.py`, `ops/streaming.py`, `ops/adakv.py`).

Their CPU implementation is the PyTorch reference (`kvsurgery.reference.core`); the decode ops also have Triton
kernels on CUDA (`kvsurgery.kernels`). Mutating ops write the store in place and return
nothing, so Inductor re-inplaces them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery.errors import SurgeryNotAppliedError
from kvsurgery.ops.schema import OpDef, like_q
from kvsurgery.reference import core as reference
from kvsurgery.store import CORE_TENSORS

DENSE = ("k_store", "v_store", "pos", "start", "length", "seen")  # what decode attention reads of the store


def not_rewritten(layer_idx: int, **_) -> None:
    """Running the `kv_update` marker means the surgery pipeline did not replace it: refuse, never fall back."""
    raise SurgeryNotAppliedError(
        f"attention layer {layer_idx} ran without the kvsurgery rewrite (the forward was not captured by Dynamo; "
        "is TORCHDYNAMO_DISABLE set, or was the model called through its class instead of the instance?). "
        "kvsurgery never falls back to uncompressed attention: call the model returned by kvsurgery.apply()."
    )


def new_kv(k: Tensor, v: Tensor, **_) -> tuple[Tensor, Tensor]:
    return k.new_empty(k.shape), v.new_empty(v.shape)


def snapshot(t: Tensor) -> Tensor:
    """A copy of `t` as it is now: an opaque op the compiler cannot move past a later mutation (read_order)."""
    return t.clone()


def like_t(t: Tensor) -> Tensor:
    return torch.empty_like(t)


OPS = (
    # Emitted by `KVStore.update`; carries the layer's store tensors and their comma-separated names, so passes
    # can wire them into the ops they insert, and whether its KV heads' segments are equal (LayerPlan.uniform_heads).
    OpDef(
        "kv_update",
        ("Tensor k", "Tensor v", "Tensor[] store", "str names", "int layer_idx", "bool prefill", "bool uniform_heads"),
        not_rewritten,
        new_kv,
        returns="(Tensor, Tensor)",
    ),
    OpDef(
        "select_compact_",
        (
            *CORE_TENSORS,
            "Tensor k",
            "Tensor v",
            "Tensor? scores",
            "Tensor? budgets",
            "Tensor? mask",
            "int sinks",
            "int window",
        ),
        reference.select_compact_,
        writes=CORE_TENSORS,
    ),
    OpDef(
        "append_",
        (
            *CORE_TENSORS,
            "Tensor k",
            "Tensor v",
            "int sinks",
            "int window",
            "bool evict",
            "bool by_score",
            "str score_new",
        ),
        reference.append_,
        writes=CORE_TENSORS,
    ),
    OpDef("attend", ("Tensor q", *DENSE, "float scale", "int window"), reference.attend, like_q, "Tensor"),
    OpDef(
        "attend_accumulate_",
        ("Tensor q", *DENSE[:3], "slot_score", *DENSE[3:], "float scale", "int window"),
        reference.attend_accumulate_,
        like_q,
        "Tensor",
        writes=("slot_score",),
    ),
    OpDef("snapshot", ("Tensor t",), snapshot, like_t, "Tensor"),
)
