"""Small helpers over Dynamo FX graphs: names, module paths, tracing through views, op counts."""

from __future__ import annotations

import operator
import re
import types
from collections import Counter

import torch
from torch import fx

# Ops that only reshape/retype a tensor: attention inputs are traced back through them to their source.
_VIEW_METHODS = {"view", "reshape", "expand", "contiguous", "transpose", "to", "float", "half", "bfloat16", "clone"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.repeat_interleave}
# node.meta key on the ops a pass inserts: the site's KV heads have equal segments (`LayerPlan.uniform_heads`)
UNIFORM_HEADS = "kvsurgery_uniform_heads"


def is_kv_update(node: fx.Node) -> bool:
    """Whether a node calls kvsurgery's cache marker (Dynamo records the op packet, passes the overload)."""
    return node.op == "call_function" and node.target in (
        torch.ops.kvsurgery.kv_update,
        torch.ops.kvsurgery.kv_update.default,
    )


def op_name(node: fx.Node) -> str:
    """A short readable name for what a node computes ("scaled_dot_product_attention", "kvsurgery.attend", ...)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    if node.op == "call_method":
        return str(target)
    return getattr(target, "__name__", str(target))


def op_counts(graph: fx.Graph) -> Counter[str]:
    """How many nodes of each op the graph computes (placeholders and outputs excluded)."""
    return Counter(op_name(n) for n in graph.nodes if n.op in ("call_function", "call_method"))


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module a node was traced in ("model.layers.3.self_attn"), or ""."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[A-Za-z_]+'\]\.?", "", raw)  # the compiled frame's local holding the model
    path = re.sub(r"^__self__\.?", "", path)  # a bound method's model
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def example(node: fx.Node | None) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node's value, if any."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def is_view_like(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def trace_source(node: fx.Node) -> fx.Node:
    """Follow a tensor back through view/expand/transpose/getitem-slicing (e.g. GQA `repeat_kv`) to its source."""
    while is_view_like(node) and node.args and isinstance(node.args[0], fx.Node):
        if node.op == "call_function" and node.target is operator.getitem and not _is_tensor_slice(node):
            break
        node = node.args[0]
    return node


def _is_tensor_slice(node: fx.Node) -> bool:
    """`x[...]` on a tensor (a view), as opposed to picking an element of a tuple result."""
    return example(node.args[0]) is not None


def arg(node: fx.Node, index: int, name: str, default=None):
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def mutates_in_place(node: fx.Node) -> bool:
    """An in-place tensor method (`x.copy_(y)`, `x.add_(1)`): FX's default dead-code elimination treats every
    call_method as pure and drops it when its result is unused, e.g. the write-back of a traced in-place
    `dist.all_reduce` (tensor-parallel row-sharded projections)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and isinstance(name, str) and _is_inplace_name(name)


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Remove unused nodes, keeping in-place mutations (see `mutates_in_place`) and FX's own impure nodes."""
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or mutates_in_place(node))


def own_code_copy(fn, name: str):
    """A copy of `fn` with its own code object and globals. Dynamo stores compiled entries, and counts recompiles,
    per code object, and installs compiled graphs as globals of the frame: each rewritten model gets private ones,
    so models never share (or exhaust) each other's entries, and the module's globals never collect graphs."""
    return types.FunctionType(fn.__code__.replace(co_name=name), dict(fn.__globals__), name)
