"""Which prompt tokens are visual: the modality mask of vision-language models, built inside the captured graph.

A LLaVA- or Qwen2-VL-style model expands every image into placeholder tokens of one id (the config's
`image_token_id`, also `video_token_id` for videos) before its language model runs, so `input_ids == id` marks
exactly the positions whose keys come from image features. Passes get it as a graph node, computed from the graph's
`input_ids` input: `is_visual = visual_mask(rw, visual_token_ids(model))` -> bool [B, T].
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from kvsurgery.errors import UnsupportedModelError
from kvsurgery.fx_utils import example

_TOKEN_ID_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
_MASK_TAG = "kvsurgery_is_visual"


def visual_token_ids(model: torch.nn.Module, needed_by: str) -> tuple[int, ...]:
    """The placeholder token ids of images (and videos) in `model`'s config; a clear error for text-only models."""
    config = model.config
    ids = []
    for field in _TOKEN_ID_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value >= 0 and value not in ids:
            ids.append(value)
    if not ids:
        raise UnsupportedModelError(
            f"'{needed_by}' needs to know which prompt tokens are visual, and reads it from the image token id of a "
            f"vision-language model's config; {type(model).__name__}'s config has no image_token_id (nor "
            "image_token_index). Use a LLaVA- or Qwen2-VL-style model, or a text-only recipe such as 'snapkv'."
        )
    return tuple(ids)


def _input_ids(graph: fx.Graph) -> fx.Node | None:
    """The graph input holding the call's `input_ids` (Dynamo names its source L['call']['input_ids'])."""
    for node in graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", "")
        value = example(node)
        if str(source).endswith("['input_ids']") and value is not None and value.dim() == 2:
            return node
    return None


def visual_mask(graph: fx.Graph, token_ids: tuple[int, ...], needed_by: str) -> fx.Node:
    """A bool [B, T] node, True where the prompt token is an image (or video) placeholder; built once per graph,
    right after the graph's inputs."""
    for node in graph.nodes:
        if node.meta.get(_MASK_TAG):
            return node
    ids = _input_ids(graph)
    if ids is None:
        raise UnsupportedModelError(
            f"'{needed_by}' derives the modality of each prompt token from input_ids, but this call passed none "
            "(inputs_embeds?); call generate()/forward() with input_ids"
        )
    last_input = list(graph.find_nodes(op="placeholder"))[-1]
    with graph.inserting_after(last_input):
        mask = graph.call_function(operator.eq, (ids, token_ids[0]))
    for token in token_ids[1:]:
        with graph.inserting_after(mask):
            other = graph.call_function(operator.eq, (ids, token))
        with graph.inserting_after(other):
            mask = graph.call_function(operator.or_, (mask, other))
    mask.meta[_MASK_TAG] = True
    return mask
