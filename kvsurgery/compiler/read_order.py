"""Keep reads of store tensors ahead of the kvsurgery ops that mutate them when Inductor compiles the graph.

Inductor may recompute a cheap pointwise read of a graph input (the RoPE positions and the causal-mask offset
computed from `seen`) inside a kernel that runs after a fallback kernel mutated that input, so the read sees
the new value (measured on torch 2.13: non-causal prefill, decode positions off by one; the same family as
pytorch/pytorch#198101). Routing those reads through the opaque `kvsurgery::snapshot` op makes the value exist
before the mutating op runs. Reads that come after the op (and the ops themselves) are left alone.
"""

from __future__ import annotations

import torch
from torch import fx


def _kvsurgery_op(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == "kvsurgery"
    )


def _written(node: fx.Node) -> list[fx.Node]:
    """The graph values a kvsurgery op mutates in place (its schema's `Tensor(a!)` arguments)."""
    out = []
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node):
            out.append(value)
    return out


def snapshot_early_reads(graph: fx.Graph) -> int:
    """Make every non-kvsurgery read of a tensor that precedes the first kvsurgery op mutating it read a
    snapshot taken before that op. Returns the number of snapshots inserted."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    first_write: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if _kvsurgery_op(node):
            for tensor in _written(node):
                first_write.setdefault(tensor, order[node])
    inserted = 0
    for tensor, at in first_write.items():
        early = sorted((u for u in tensor.users if order[u] < at and not _kvsurgery_op(u)), key=order.__getitem__)
        if not early:
            continue
        with graph.inserting_before(early[0]):
            snap = graph.call_function(torch.ops.kvsurgery.snapshot.default, (tensor,))
        if "example_value" in tensor.meta:
            snap.meta["example_value"] = tensor.meta["example_value"]
        for user in early:
            user.replace_input_with(tensor, snap)
        inserted += 1
    return inserted
