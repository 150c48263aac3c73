"""StreamingLLM's op (`torch.ops.kvsurgery.score_recency`): the token index as its score; its specification is
`kvsurgery.reference.streaming`."""

from __future__ import annotations

from kvsurgery.ops.schema import OpDef, token_scores
from kvsurgery.reference import streaming as reference

OPS = (OpDef("score_recency", ("Tensor k",), reference.recency_scores, token_scores, "Tensor"),)
