"""Double Sparsity's ops (`kvsurgery::label_*_`, `sparse_attend`), backed by `kvsurgery.reference.doublesparse`.

The calibrated channels reach them as a flat int list (a graph constant Inductor accepts) and become the [Hq, r]
table the reference takes.
"""

from __future__ import annotations

from torch import Tensor

from kvsurgery.ops.schema import OpDef, like_q
from kvsurgery.reference import doublesparse as ds
from kvsurgery.store import LABEL_TENSORS, LayerTensors


def query_heads(s: LayerTensors) -> int:
    """Hq of a layer: KV heads x the labels each slot holds (one per query head of its group)."""
    return s.start.shape[1] * s.labels.shape[2]


def label_fill(s: LayerTensors, channels: list[int], bits: int) -> None:
    ds.label_fill_(s, ds.channel_table(channels, query_heads(s), s.k_store.device), bits)


def label_append(s: LayerTensors, k: Tensor, channels: list[int], bits: int) -> None:
    ds.label_append_(s, k, ds.channel_table(channels, query_heads(s), k.device), bits)


def sparse_attend(
    q: Tensor, s: LayerTensors, channels: list[int], scale: float, tokens: int, fraction: float, bits: int
) -> Tensor:
    table = ds.channel_table(channels, q.shape[1], q.device)
    return ds.sparse_attend(q, s, table, scale, tokens, fraction, bits)


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
