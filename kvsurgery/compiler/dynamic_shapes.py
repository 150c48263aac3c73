"""The dimensions Dynamo traces symbolically from the first call on, so a new prompt length reuses the graphs.

Without these marks the first prompt compiles static graphs and the second distinct length compiles everything
again before Dynamo's automatic dynamic shapes take over. Marked: the prompt-length axis of the prefill inputs and
the slot axis of every store tensor (its size follows the prompt length). Batch and head axes stay static, and the
decode step's own shapes (one token) are unaffected, so each decode graph keeps static store addresses.
"""

from __future__ import annotations

import torch

from kvsurgery.store import KVStore

_TOKEN_AXIS = {"input_ids": 1, "inputs_embeds": 1, "attention_mask": 1, "position_ids": 1, "cache_position": 0}


def _mark(tensor: torch.Tensor, dim: int) -> None:
    # maybe_mark_dynamic: a size Dynamo must specialize (0 or 1, or one the model branches on) is no error
    if isinstance(tensor, torch.Tensor) and tensor.ndim > dim:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)


def mark_prompt_dynamic(call: dict) -> None:
    """Mark the token axis of the forward's prompt inputs dynamic (a 4D attention mask: its query and key axes)."""
    for name, dim in _TOKEN_AXIS.items():
        value = call.get(name)
        if name == "attention_mask" and isinstance(value, torch.Tensor) and value.ndim == 4:
            _mark(value, 2)
            _mark(value, 3)
        else:
            _mark(value, dim)


def mark_store_dynamic(store: KVStore) -> None:
    """Mark the slot axis (dim 1) of every store tensor that has one (`StoreLayer.slot_axis_tensors`)."""
    for layer in store.layers:
        for tensor in layer.slot_axis_tensors():
            _mark(tensor, 1)
