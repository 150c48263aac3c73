"""Find attention sites in a Dynamo FX graph: an attention computation fed by a KV-cache update.

Attention is either a `scaled_dot_product_attention` call or the eager matmul -> softmax -> matmul pattern.
Its K/V inputs are traced back (through GQA repeats, transposes, slices) to the cache update that produced
them: `torch.cat` onto a cache tensor (transformers' DynamicCache), an in-place `index_copy_` into one
(StaticCache), or kvsurgery's own `kv_update` marker (our store). The layer index comes from the node's
module metadata, never from class names.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx

from kvsurgery.errors import UnsupportedModelError
from kvsurgery.fx_utils import arg, example, is_kv_update, module_path, trace_source

if TYPE_CHECKING:
    from kvsurgery.distributed import HeadShard

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
_SOFTMAX_TARGETS = (torch.nn.functional.softmax, torch.softmax)
_CAST_METHODS = {"to", "float", "half", "bfloat16", "type_as"}


@dataclass(frozen=True)
class AttentionSite:
    """What kvsurgery knows about one attention layer of the model (found once, at apply time)."""

    layer: int
    module: str
    kind: str  # "sdpa" or "eager"
    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    sliding_window: int | None
    shard: HeadShard | None = None  # tensor parallelism: the heads above are this process's share of the model's

    @property
    def model_kv_heads(self) -> int:
        """The model's KV heads over every process (`n_kv_heads` unless tensor parallelism splits them)."""
        return self.shard.model_kv_heads if self.shard is not None else self.n_kv_heads

    @property
    def kv_heads(self) -> range:
        """Which of the model's KV heads this site holds, e.g. to slice a per-head table of the whole model."""
        offset = self.shard.offset if self.shard is not None else 0
        return range(offset, offset + self.n_kv_heads)

    def describe(self) -> str:
        """The site's attention, without its layer: "sdpa, 9 q heads / 3 kv heads, head_dim 64"."""
        window = f", sliding window {self.sliding_window}" if self.sliding_window else ""
        heads = self.kv_heads
        kv = f"{self.n_kv_heads} kv heads"
        if self.shard is not None:
            kv += f" (heads {heads.start}-{heads.stop - 1} of {self.model_kv_heads})"
        return f"{self.kind}, {self.n_heads} q heads / {kv}, head_dim {self.head_dim}{window}"


@dataclass
class AttentionMatch:
    """One attention computation in a graph. `output` is the node whose value is the attention output."""

    kind: str
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    scale: float


@dataclass
class CacheMatch:
    """The cache update feeding an attention: `k_new`/`v_new` are this step's keys/values (after RoPE)."""

    kind: str  # "dynamic", "static" or "kvsurgery"
    k_new: fx.Node
    v_new: fx.Node
    marker: fx.Node | None = None  # the kvsurgery.kv_update node


@dataclass
class SiteMatch:
    layer: int
    module: str
    attention: AttentionMatch
    cache: CacheMatch


def _const(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _match_sdpa(node: fx.Node) -> AttentionMatch | None:
    if not (node.op == "call_function" and node.target in SDPA_TARGETS):
        return None
    q, k, v = node.args[:3]
    scale = arg(node, 6, "scale")
    if scale is None:
        scale = 1.0 / math.sqrt(example(q).shape[-1])
    return AttentionMatch("sdpa", node, q, k, v, arg(node, 3, "attn_mask"), float(scale))


def _is_softmax(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _SOFTMAX_TARGETS) or (
        node.op == "call_method" and node.target == "softmax"
    )


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (torch.matmul, operator.matmul)) or (
        node.op == "call_method" and node.target == "matmul"
    )


def _match_eager(softmax: fx.Node) -> AttentionMatch | None:
    """matmul(q, k^T) [* scale] [+ mask] -> softmax [-> casts/dropout] -> matmul(., v)."""
    node, mask, scale = softmax.args[0], None, 1.0
    if node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2:
        node, mask = node.args
    if node.op == "call_function" and node.target in (operator.mul, torch.mul, operator.truediv):
        factor = _const(node.args[1])
        if factor is None:
            return None
        scale = 1.0 / factor if node.target is operator.truediv else factor
        node = node.args[0]
    if not _is_matmul(node):
        return None
    q, k_t = node.args[:2]
    out = softmax
    while len(out.users) == 1:
        (user,) = out.users
        if user.op == "call_method" and user.target in _CAST_METHODS:
            out = user
        elif user.op == "call_function" and user.target is torch.nn.functional.dropout:
            out = user
        else:
            break
    users = list(out.users)
    if len(users) != 1 or not _is_matmul(users[0]) or users[0].args[0] is not out:
        return None
    return AttentionMatch("eager", users[0], q, k_t, users[0].args[1], mask, scale)


def find_attention(graph: fx.Graph) -> list[AttentionMatch]:
    """All attention computations in the graph, in graph order."""
    found = []
    for node in graph.nodes:
        match = _match_sdpa(node) or (_match_eager(node) if _is_softmax(node) else None)
        if match is not None:
            found.append(match)
    return found


def _cache_source(node: fx.Node) -> tuple[str, fx.Node, fx.Node | None] | None:
    """(kind, new tensor, marker) for a K or V source that is a cache update, else None."""
    src = trace_source(node)
    if src.op == "call_function" and src.target is operator.getitem:
        parent = src.args[0]
        if isinstance(parent, fx.Node) and is_kv_update(parent):
            return "kvsurgery", parent.args[src.args[1]], parent
    if src.op == "call_function" and src.target is torch.cat:
        parts = src.args[0]
        if len(parts) == 2 and parts[0].op == "placeholder":
            return "dynamic", parts[1], None
    if src.op == "placeholder":
        for user in src.users:
            if user.op == "call_method" and user.target in ("index_copy_", "index_put_") and user.args[0] is src:
                return "static", user.args[-1] if user.target == "index_copy_" else user.args[2], None
    return None


def find_cache_updates(graph: fx.Graph) -> list[fx.Node]:
    """Nodes appending new keys/values onto a cache tensor (DynamicCache's torch.cat onto a graph input)."""
    return [
        n
        for n in graph.nodes
        if n.op == "call_function"
        and n.target is torch.cat
        and len(n.args[0]) == 2
        and n.args[0][0].op == "placeholder"
        and n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0) in (-2, 2)
    ]


def layer_index(module: str, model: torch.nn.Module | None, marker: fx.Node | None) -> int:
    if marker is not None:
        return int(marker.args[4])
    if model is not None:
        try:
            idx = getattr(model.get_submodule(module), "layer_idx", None)
        except AttributeError:
            idx = None
        if isinstance(idx, int):
            return idx
    match = re.search(r"layers\.(\d+)", module)
    if match is None:
        raise UnsupportedModelError(f"cannot tell which layer the attention in module '{module}' belongs to")
    return int(match.group(1))


def find_sites(graph: fx.Graph, model: torch.nn.Module | None = None) -> list[SiteMatch]:
    """Attention computations paired with the cache update that feeds them, sorted by layer."""
    sites = []
    for attn in find_attention(graph):
        k_src, v_src = _cache_source(attn.k), _cache_source(attn.v)
        if k_src is None or v_src is None:
            continue  # attention over non-cached tensors (e.g. a vision tower): not a KV-cache site
        module = module_path(attn.output)
        cache = CacheMatch(k_src[0], k_src[1], v_src[1], k_src[2])
        sites.append(SiteMatch(layer_index(module, model, cache.marker), module, attn, cache))
    return sorted(sites, key=lambda s: s.layer)


def unpaired_markers(graph: fx.Graph, sites: list[SiteMatch]) -> list[fx.Node]:
    """kvsurgery cache markers whose output feeds no recognised attention computation."""
    paired = {s.cache.marker for s in sites}
    return [n for n in graph.nodes if is_kv_update(n) and n not in paired]
