"""Double Sparsity's ops (`kvsurgery::label_*_`, `sparse_attend`), backed by `kvsurgery.reference.doublesparse`.

The calibrated channels reach them as a flat int list (a graph constant Inductor accepts) and become the [Hq, r]
table the reference takes.
"""

from __future__ import annotations

from torch import Tensor

from kvsurgery.ops.schema import OpDef, like_q
from kvsurgery.reference import doublesparse as ds
from kvsurgery.store import LABEL_TENSORS


def label_fill(labels: Tensor, label_range, k_store: Tensor, start: Tensor, cap: Tensor, channels, bits: int) -> None:
    table = ds.channel_table(channels, start.shape[1] * labels.shape[2], k_store.device)
    ds.label_fill_(labels, label_range, k_store, start, cap, table, bits)


def label_append(labels: Tensor, label_range, k: Tensor, start: Tensor, length: Tensor, channels, bits: int) -> None:
    table = ds.channel_table(channels, start.shape[1] * labels.shape[2], k.device)
    ds.label_append_(labels, label_range, k, start, length, table, bits)


def sparse_attend(q: Tensor, channels, **args) -> Tensor:
    return ds.sparse_attend(q, channels=ds.channel_table(channels, q.shape[1], q.device), **args)


OPS = (
    # Prefill: labels of every stored key.
    OpDef(
        "label_fill_",
        (*LABEL_TENSORS, "k_store", "start", "cap", "int[] channels", "int bits"),
        label_fill,
        writes=LABEL_TENSORS,
    ),
    # Decode: the label of the key `append_` just wrote.
    OpDef(
        "label_append_",
        (*LABEL_TENSORS, "Tensor k", "start", "length", "int[] channels", "int bits"),
        label_append,
        writes=LABEL_TENSORS,
    ),
    # Decode attention: top-k tokens per KV head by label score, exact attention over them.
    OpDef(
        "sparse_attend",
        (
            "Tensor q",
            "k_store",
            "v_store",
            "pos",
            "keep",
            "start",
            "length",
            "seen",
            *LABEL_TENSORS,
            "int[] channels",
            "float scale",
            "int tokens",
            "float fraction",
            "int bits",
        ),
        sparse_attend,
        like_q,
        "Tensor",
    ),
)
