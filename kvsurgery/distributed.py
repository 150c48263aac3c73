"""Tensor parallelism (transformers `tp_plan`): each process holds a contiguous share of every layer's KV heads.

Discovery captures this process's forward, so its attention sites (and the store) already hold only its own heads.
This module says which of the model's heads those are (`AttentionSite.kv_heads`), so per-head tables of the whole
model, such as HeadKV's budgets, are sliced rather than recomputed per process; it checks that every process applies
the same recipe; and it refuses, at `apply`, the passes that decide across the heads of a layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvsurgery.errors import RecipeError, UnsupportedModelError
from kvsurgery.pass_base import Pass
from kvsurgery.sites import AttentionSite

# Built-in passes that run with the heads split: their decisions for a KV head read only that head (its query group,
# keys, values, scores), per-layer plans, or per-head tables of the whole model sliced by `AttentionSite.kv_heads`.
SUPPORTED = frozenset(
    {
        "full",
        "snapkv",
        "uniform",
        "pyramidkv",
        "headkv",
        "headkv-r2",
        "streaming",
        "h2o",
        "decode_window",
        "kivi2",
        "kivi4",
        "quant1bit",
        "quant2bit",
        "csp",
        "select",
        "attend",
    }
)
REFUSED = {
    "adakv": (
        "it moves budget between the KV heads of a layer at prefill (a top-k over all their scores), and with the "
        "heads on different processes no process's fixed-size store can take what another's heads give up"
    ),
    "prefixkv": "its token scores are averaged over every KV head of a layer, and the heads are split across processes",
    "doublesparse": "its channel calibration is indexed by the model's query heads and is not sliced per process",
}


@dataclass(frozen=True)
class HeadShard:
    """This process's share of a layer's KV heads: the model's heads [offset, offset + n_kv_heads) of the site."""

    rank: int  # this process's index in the tensor-parallel group
    world: int  # processes in the group
    offset: int
    model_kv_heads: int


def check_tensor_parallel(model: torch.nn.Module, passes: list[Pass], agreed: str) -> None:
    """Before discovery: refuse passes that cannot run on a tensor-parallel model, and processes applying different
    recipes (`agreed`: the recipe, budget and options as text). All processes call it together."""
    mesh = tensor_parallel_mesh(model)
    if mesh is None:
        return
    for p in passes:
        reason = REFUSED.get(p.name)
        if reason is None and p.name not in SUPPORTED and not getattr(p, "head_local", False):
            reason = (
                "it is not known to decide each KV head from that head alone; if it does, set `head_local = True` "
                "on its class"
            )
        if reason is not None:
            raise RecipeError(f"'{p.name}' cannot run on a tensor-parallel model ({mesh.size()} processes): {reason}")
    seen = [None] * mesh.size()
    torch.distributed.all_gather_object(seen, agreed, group=mesh.get_group())
    if len(set(seen)) > 1:
        each = "; ".join(f"rank {r}: {applied}" for r, applied in enumerate(seen))
        raise RecipeError(f"every tensor-parallel process must apply the same recipe, got {each}")


def shard_sites(model: torch.nn.Module, sites: list[AttentionSite]) -> list[AttentionSite]:
    """The sites with their share of the model's KV heads when tensor parallelism splits them (else unchanged).

    All processes call it together: it gathers the heads each one holds.
    """
    text = model.config.get_text_config(decoder=True)
    model_heads = text.num_attention_heads
    model_kv = getattr(text, "num_key_value_heads", None) or model_heads
    mesh = tensor_parallel_mesh(model)
    if mesh is None:
        split = [s for s in sites if s.n_kv_heads != model_kv]
        if split:
            raise UnsupportedModelError(
                f"layer {split[0].layer} holds {split[0].n_kv_heads} of the model's {model_kv} KV heads, but no "
                "weight is a sharded DTensor: kvsurgery supports tensor parallelism through transformers' tp_plan"
            )
        return sites
    rank, world = mesh.get_local_rank(), mesh.size()
    seen = [None] * world
    torch.distributed.all_gather_object(seen, [(s.n_heads, s.n_kv_heads) for s in sites], group=mesh.get_group())
    if all(s.n_kv_heads == model_kv for s in sites):
        return sites  # the weights are sharded but every process holds every KV head
    even = (model_heads // world, model_kv // world)
    for i, site in enumerate(sites):
        shares = [tuple(heads[i]) for heads in seen]
        if model_kv % world or model_heads % world or any(share != even for share in shares):
            raise UnsupportedModelError(
                f"tensor parallelism splits layer {site.layer}'s {model_heads} query / {model_kv} KV heads unevenly "
                f"over {world} processes ((query, KV) heads per process: {shares}); kvsurgery needs an even split: "
                f"use a tp_size that divides {model_kv}"
            )
    return [dataclasses.replace(s, shard=HeadShard(rank, world, rank * s.n_kv_heads, model_kv)) for s in sites]


def tensor_parallel_mesh(model: torch.nn.Module):
    """The device mesh the model's weights are sharded over (a DTensor with a Shard placement), or None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    sharded = [
        (name, p)
        for name, p in model.named_parameters()
        if isinstance(p, DTensor) and any(not isinstance(pl, Replicate) for pl in p.placements)
    ]
    for name, p in sharded:
        if p.device_mesh.ndim != 1 or any(type(pl) not in (Shard, Replicate) for pl in p.placements):
            raise UnsupportedModelError(
                f"{name} is laid out as {p.placements} over {p.device_mesh}; kvsurgery supports contiguous "
                "tensor-parallel shards over one mesh dimension (transformers tp_plan='auto')"
            )
    return sharded[0][1].device_mesh if sharded else None
