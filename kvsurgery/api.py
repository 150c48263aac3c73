"""Public entry points: apply, restore, new_cache."""

from __future__ import annotations

import torch

from kvsurgery.budget import Budget
from kvsurgery.capture import check_causal_lm, discover
from kvsurgery.distributed import check_tensor_parallel, shard_sites
from kvsurgery.errors import BudgetError, KVSurgeryError
from kvsurgery.manager import build_recipe, check_sites
from kvsurgery.runtime import Surgery
from kvsurgery.store import KVStore


def apply(
    model: torch.nn.Module,
    recipe: str,
    budget: int | float | None = None,
    *,
    compile: bool = False,
    max_new_tokens: int = 256,
    **options,
) -> torch.nn.Module:
    """Rewrite `model` so its KV cache is compressed by `recipe`; returns the same model object.

    recipe          pass names joined by '+', e.g. "snapkv", "pyramidkv", "snapkv(window=16)"
    budget          tokens kept per KV head (int) or a fraction of the prompt (float in (0, 1])
    compile         hand the rewritten graphs to Inductor (CUDA graphs for decode on GPU)
    max_new_tokens  decode room of caches created by forward() without generate() (generate sizes its own)
    options         pass options, e.g. window=16, routed to the pass of the recipe that has them

    Applying twice is an error: call kvsurgery.restore(model) first. See kvsurgery.recipes() for the passes.
    """
    if "_kvsurgery" in model.__dict__:
        raise KVSurgeryError(
            f"kvsurgery is already applied to this model (recipe {model._kvsurgery.recipe.text!r}); "
            "call kvsurgery.restore(model) before applying another recipe"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KVSurgeryError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    built = build_recipe(recipe, budget, **options)
    check_causal_lm(model)
    _check_budget_fits(model, built.budget)
    agreed = f"{built.text!r} budget={built.budget} compile={compile} max_new_tokens={max_new_tokens}"
    check_tensor_parallel(model, built.passes, agreed)
    built.check_model(model)
    found = discover(model)
    sites = shard_sites(model, found.sites)
    check_sites(built, sites)
    surgery = Surgery(model, built, sites, found.op_counts, compile, max_new_tokens)
    surgery.install()
    return model


def _check_budget_fits(model: torch.nn.Module, budget: Budget | None) -> None:
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if budget is not None and budget.tokens is not None and limit and budget.tokens > limit:
        raise BudgetError(
            f"budget {budget.tokens} exceeds the model's context length of {limit} tokens; "
            f"use a budget <= {limit} (or a fraction of the prompt, e.g. budget=0.2)"
        )


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply`: the model's own forward and generate are back; weights were never touched."""
    surgery = model.__dict__.get("_kvsurgery")
    if surgery is None:
        raise KVSurgeryError("kvsurgery.restore: this model has no kvsurgery applied")
    surgery.uninstall()
    return model


def new_cache(model: torch.nn.Module, max_new_tokens: int | None = None) -> KVStore:
    """An empty compressed cache for a rewritten model, for manual forward() loops."""
    surgery = model.__dict__.get("_kvsurgery")
    if surgery is None:
        raise KVSurgeryError("kvsurgery.new_cache: apply a recipe to the model first (kvsurgery.apply)")
    return surgery.new_store(max_new_tokens)
