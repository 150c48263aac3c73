"""Read attention probabilities out of a transformers model during calibration: eager attention plus forward hooks
on the attention modules, so each layer's [B, H, Tq, Tk] probabilities are reduced as they are made (never all
layers' matrices at once, as `output_attentions=True` would keep)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from kvsurgery.errors import CalibrationError, UnsupportedModelError


def attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module, int]]:
    """(layer index, attention module, index of the probabilities in its output) for every decoder layer.

    The attention class is the one transformers records `attentions` from (`_can_record_outputs`), so this
    follows the model's own definition instead of guessing module names.
    """
    record = getattr(model, "_can_record_outputs", None) or {}
    target = record.get("attentions")
    index = getattr(target, "index", 1)
    cls = getattr(target, "target_class", target)
    if not isinstance(cls, type):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not declare its attention modules (transformers `_can_record_outputs`"
            "['attentions']); calibration needs them to read attention probabilities"
        )
    found = [m for m in model.modules() if isinstance(m, cls)]
    layers = [getattr(m, "layer_idx", i) for i, m in enumerate(found)]
    return [(layer, m, index) for layer, m in zip(layers, found, strict=True)]


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` with eager attention (the only implementation that materialises probabilities), then restore."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@contextlib.contextmanager
def record_attention(model: torch.nn.Module, sink: Callable[[int, Tensor], None]) -> Iterator[None]:
    """Call `sink(layer, probs)` with each layer's attention probabilities [B, H, Tq, Tk] on every forward."""
    handles = []

    def hook_for(layer: int, index: int):
        def hook(module, args, output):
            probs = output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
            if not isinstance(probs, Tensor) or probs.ndim != 4:
                raise CalibrationError(
                    f"layer {layer}'s attention returned no probabilities; load the model with "
                    "attn_implementation='eager' for calibration"
                )
            sink(layer, probs)

        return hook

    for layer, module, index in attention_modules(model):
        handles.append(module.register_forward_hook(hook_for(layer, index)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
