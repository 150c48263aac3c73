"""H2O's op (`torch.ops.kvsurgery.score_accumulated`): prefill token scores summed over every query; its
specification is `kvsurgery.reference.h2o`."""

from __future__ import annotations

from kvsurgery.ops.schema import SCORE_PARAMS, OpDef, token_scores
from kvsurgery.reference import h2o as reference

OPS = (OpDef("score_accumulated", SCORE_PARAMS, reference.accumulated_scores, token_scores, "Tensor"),)
