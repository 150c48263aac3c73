"""kvsurgery: KV-cache compression for transformers causal LMs by FX/Dynamo graph surgery.

model = kvsurgery.apply(model, recipe="snapkv", budget=256)
model.generate(ids, max_new_tokens=64)     # runs on a real, fixed-capacity compressed cache
print(kvsurgery.explain(model))
"""

from kvsurgery import ops
from kvsurgery.api import apply, new_cache, restore
from kvsurgery.errors import (
    BudgetError,
    CacheCapacityError,
    CalibrationError,
    KVSurgeryError,
    RecipeError,
    SurgeryNotAppliedError,
    UnsupportedModelError,
)
from kvsurgery.explain import explain
from kvsurgery.pass_base import Pass
from kvsurgery.registry import recipes, register_pass

ops.register()  # defines torch.ops.kvsurgery.* and their CUDA kernels, once

__all__ = [
    "BudgetError",
    "CacheCapacityError",
    "CalibrationError",
    "KVSurgeryError",
    "Pass",
    "RecipeError",
    "SurgeryNotAppliedError",
    "UnsupportedModelError",
    "apply",
    "explain",
    "new_cache",
    "recipes",
    "register_pass",
    "restore",
]
__version__ = "0.1.0"
