"""Ada-KV's op (`torch.ops.kvsurgery.budget_adakv`): per-KV-head budgets from the layer's token scores; its
specification is `kvsurgery.reference.adakv`."""

from __future__ import annotations

import torch
from torch import Tensor

from kvsurgery.ops.schema import OpDef
from kvsurgery.reference import adakv as reference


def head_budgets(scores: Tensor, **_) -> Tensor:
    return scores.new_empty(scores.shape[:2], dtype=torch.int32)


OPS = (
    OpDef(
        "budget_adakv",
        ("Tensor scores", "Tensor? mask", "Tensor keep", "int sinks", "int window", "float floor", "bool normalize"),
        reference.adakv_budgets,
        head_budgets,
        "Tensor",
    ),
)
