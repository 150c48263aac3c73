"""The installed surgery: a Dynamo-compiled forward whose backend runs the pass pipeline on every graph it
captures, plus thin `forward`/`generate` wrappers that allocate the compressed store."""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
from torch import fx
from transformers.cache_utils import Cache

from kvsurgery.compat import cache_keyword, pop_cache
from kvsurgery.compiler.cpu_lowering import lower_decode_ops
from kvsurgery.compiler.dynamic_shapes import mark_prompt_dynamic, mark_store_dynamic
from kvsurgery.compiler.private_compile import PrivateCompile
from kvsurgery.compiler.read_order import snapshot_early_reads
from kvsurgery.errors import KVSurgeryError
from kvsurgery.manager import GraphReport, Recipe
from kvsurgery.sites import AttentionSite
from kvsurgery.store import KVStore, LayerPlan

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
# torch >= 2.13 can bound recompiles per torch.compile call; older versions use the global limit.
_COMPILE_LIMITS = (
    {"recompile_limit": 16, "isolate_recompiles": True}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters
    else {}
)


def _forward_step(forward, call: dict):
    return forward(**call)


class Surgery:
    """Everything `kvsurgery.apply` installed on one model (reachable as `model._kvsurgery`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        recipe: Recipe,
        sites: list[AttentionSite],
        discovery_counts: dict[str, int],
        compile: bool,
        max_new_tokens: int,
    ):
        self.model = model
        self.recipe = recipe
        self.sites = sites
        self.sites_by_layer = {s.layer: s for s in sites}
        self.discovery_counts = discovery_counts
        self.compile = compile
        self.max_new_tokens = max_new_tokens
        self.reports: dict[str, GraphReport] = {}
        self.last_store: KVStore | None = None
        self.original_forward = type(model).forward.__get__(model)
        self.original_generate = type(model).generate.__get__(model)
        self.signature = inspect.signature(self.original_forward)
        self.cache_keyword = cache_keyword(self.original_forward)  # `cache` from transformers 5.24 on
        self.defaults = {
            p.name: p.default for p in self.signature.parameters.values() if p.default is not inspect.Parameter.empty
        }
        self.compiled_step = PrivateCompile(
            _forward_step, f"kvsurgery_forward_{id(self):x}", _weak_backend(self), fullgraph=True, **_COMPILE_LIMITS
        )
        # restore() releases the compiled state; a model deleted while applied releases it when collected
        self._release = weakref.finalize(self, self.compiled_step.release)
        self._params = {s.layer: next(model.get_submodule(s.module).parameters()) for s in sites}

    # -- graph side ---------------------------------------------------------------------------------
    def _backend(self, gm: fx.GraphModule, example_inputs):
        report = self.recipe.rewrite(gm, self.sites_by_layer)
        self.reports[report.phase or "no cache"] = report
        if not self.compile:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
        if report.phase == "decode" and on_cpu and lower_decode_ops(gm.graph):  # Inductor fuses them (see module)
            gm.recompile()
        if snapshot_early_reads(gm.graph):
            gm.recompile()
        cudagraphs = report.phase == "decode" and torch.cuda.is_available()
        return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": cudagraphs})

    # -- store side ---------------------------------------------------------------------------------
    def plan(self, row_lengths: list[int], max_new_tokens: int) -> list[LayerPlan]:
        return self.recipe.plan(self.sites, row_lengths, max_new_tokens)

    def dtype_of(self, layer: int) -> torch.dtype:
        return self._params[layer].dtype

    def device_of(self, layer: int) -> torch.device:
        return self._params[layer].device

    def new_store(self, max_new_tokens: int | None = None) -> KVStore:
        """An empty compressed cache for this model, with room for `max_new_tokens` decoded tokens."""
        return KVStore(self, self.max_new_tokens if max_new_tokens is None else max_new_tokens)

    # -- the wrappers installed on the model ----------------------------------------------------------
    def forward(self, *args, **kwargs):
        call = self._as_kwargs(args, kwargs)
        use_cache = call.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config.get_text_config(decoder=True), "use_cache", True)
        if not use_cache:
            return self.original_forward(**call)  # no KV cache exists: exact attention over the input
        store = self._store_for(pop_cache(call))
        _check_no_other_cache(call, store)
        inputs = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
        batch, new_tokens = inputs.shape[:2]
        if not store.prefilled:
            store.allocate(batch, new_tokens, _row_lengths(call.get("attention_mask"), batch, new_tokens))
            self.last_store = store
            mark_prompt_dynamic(call)
            mark_store_dynamic(store)
        else:
            store.check_room(new_tokens)
        call[self.cache_keyword] = store
        return_dict = call.pop("return_dict", None)
        out = self.compiled_step(self.original_forward, {**self.defaults, **call, "return_dict": True})
        if store.prefilled:
            store.decoded += new_tokens
        store.prefilled = True
        return out if return_dict is not False else out.to_tuple()

    def generate(self, *args, **kwargs):
        kwargs[self.cache_keyword] = self._store_for(pop_cache(kwargs), self._max_new_tokens(args, kwargs))
        return self.original_generate(*args, **kwargs)

    def _store_for(self, cache, max_new_tokens: int | None = None) -> KVStore:
        """The store to run on: the user's own KVStore, or a new one in place of no cache or an empty one."""
        if isinstance(cache, KVStore):
            if cache.surgery is not self:
                raise KVSurgeryError("this KVStore was created for another model; create one with this model")
            return cache
        if cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0):
            return self.new_store(max_new_tokens)
        raise KVSurgeryError(
            f"the model was rewritten by kvsurgery and needs its compressed cache, but got a "
            f"{type(cache).__name__} holding {cache.get_seq_length()} tokens; pass no cache (one is created), "
            "or kvsurgery.new_cache(model)"
        )

    def _as_kwargs(self, args: tuple, kwargs: dict) -> dict:
        names = [p.name for p in self.signature.parameters.values() if p.kind in _POSITIONAL]
        if len(args) > len(names):
            raise TypeError(f"forward() takes {len(names)} positional arguments but {len(args)} were given")
        call = dict(zip(names, args, strict=False))
        clash = set(call) & set(kwargs)
        if clash:
            raise TypeError(f"forward() got multiple values for {sorted(clash)}")
        call.update(kwargs)
        return call

    def _max_new_tokens(self, args: tuple, kwargs: dict) -> int:
        """The decode room generate() needs, from its arguments or the generation config."""
        config = kwargs.get("generation_config") or self.model.generation_config
        if kwargs.get("max_new_tokens") is not None:
            return int(kwargs["max_new_tokens"])
        if kwargs.get("max_length") is None and config.max_new_tokens is not None:
            return int(config.max_new_tokens)
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        max_length = kwargs.get("max_length") or config.max_length
        if inputs is None or max_length is None:
            return self.max_new_tokens
        return max(1, int(max_length) - inputs.shape[1])

    # -- install / uninstall ------------------------------------------------------------------------
    def install(self) -> None:
        model = self.model
        model.forward = _delegate(self.forward, self.original_forward)
        model.generate = _delegate(self.generate, self.original_generate)
        model._kvsurgery = self

    def uninstall(self) -> None:
        """Put the model's own methods back and drop everything compiled for it (nothing else refers to it)."""
        for name in ("forward", "generate", "_kvsurgery"):
            self.model.__dict__.pop(name, None)
        self._release()


def _weak_backend(surgery: Surgery):
    """The Dynamo backend of `surgery`, holding it weakly: Dynamo keeps backends in a process-wide table, which
    must not keep a deleted model alive."""
    ref = weakref.ref(surgery)

    def backend(gm: fx.GraphModule, example_inputs):
        return ref()._backend(gm, example_inputs)

    return backend


def _check_no_other_cache(call: dict, store: KVStore) -> None:
    """Refuse a call carrying a second cache object: the model could write to it instead of kvsurgery's store."""
    for name, value in call.items():
        if isinstance(value, Cache) and value is not store:
            raise KVSurgeryError(
                f"forward() got a {type(value).__name__} as {name}= besides kvsurgery's compressed cache; the model "
                "must write to the cache kvsurgery allocated. Pass one cache, as cache= or past_key_values="
            )


def _row_lengths(mask, batch: int, width: int) -> list[int]:
    """Prompt tokens per row (padding excluded), from a 2D attention mask; every row is full without one."""
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        return [int(n) for n in mask.sum(-1).tolist()]
    return [width] * batch


def _delegate(method, like):
    """A plain function calling `method`, carrying `like`'s name, docs and signature (inspect follows it)."""

    @functools.wraps(like)
    def call(*args, **kwargs):
        return method(*args, **kwargs)

    return call
