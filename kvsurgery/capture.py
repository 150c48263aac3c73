"""Discovery: capture one decode step of the untouched model with Dynamo and find its attention sites."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from transformers.cache_utils import DynamicCache

from kvsurgery.compat import cache_keyword
from kvsurgery.compiler.private_compile import PrivateCompile
from kvsurgery.errors import UnsupportedModelError
from kvsurgery.fx_utils import example, module_path, op_counts
from kvsurgery.sites import AttentionSite, SiteMatch, find_attention, find_cache_updates, find_sites

ATTENTION_OPS = ("scaled_dot_product_attention", "softmax", "matmul")


@dataclass
class Discovery:
    sites: list[AttentionSite]
    op_counts: dict[str, int]  # of the captured decode graph, before any rewrite


def check_causal_lm(model: torch.nn.Module) -> None:
    """Refuse models whose KV cache kvsurgery cannot compress, naming why."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "can_generate"):
        raise UnsupportedModelError(f"{name} is not a transformers model; kvsurgery rewrites transformers causal LMs")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; kvsurgery supports decoder-only causal LMs")
    if not model.can_generate():
        raise UnsupportedModelError(
            f"{name} is not a causal language model (it cannot generate), so it has no KV cache to compress; "
            "load it with AutoModelForCausalLM"
        )
    text = config.get_text_config(decoder=True)
    if getattr(text, "is_causal", True) is False or getattr(text, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{name} is configured with bidirectional (non-causal) attention")


def _sliding_window(model: torch.nn.Module, match: SiteMatch) -> int | None:
    module = model.get_submodule(match.module)
    if hasattr(module, "sliding_window"):
        return module.sliding_window or None
    return getattr(model.config.get_text_config(decoder=True), "sliding_window", None) or None


def _site(model: torch.nn.Module, match: SiteMatch) -> AttentionSite:
    q, k, v = example(match.attention.q), example(match.cache.k_new), example(match.cache.v_new)
    return AttentionSite(
        layer=match.layer,
        module=match.module,
        kind=match.attention.kind,
        n_heads=q.shape[1],
        n_kv_heads=k.shape[1],
        head_dim=k.shape[-1],
        v_head_dim=v.shape[-1],
        scale=match.attention.scale,
        sliding_window=_sliding_window(model, match),
    )


def _decode_step(model: torch.nn.Module, call: dict):
    return model(**call)


def discover(model: torch.nn.Module) -> Discovery:
    """Prefill 3 tokens eagerly, capture the 4th (decode) step with Dynamo, and return the sites it contains."""
    name = type(model).__name__
    text = model.config.get_text_config(decoder=True)
    device = model.get_input_embeddings().weight.device
    ids = (torch.arange(1, 5, device=device) % text.vocab_size)[None]
    graphs: list[fx.GraphModule] = []

    def capture(gm: fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            keyword = cache_keyword(model)  # looked up here, not traced
            model(input_ids=ids[:, :3], use_cache=True, **{keyword: cache})
            # released on exit: nothing of this capture (guards on the model, the graph) outlives discover()
            with PrivateCompile(_decode_step, f"kvsurgery_discover_{id(model):x}", capture, fullgraph=True) as step:
                step(model, {"input_ids": ids[:, 3:], "use_cache": True, keyword: cache})
    except torch._dynamo.exc.TorchDynamoException as exc:
        raise UnsupportedModelError(f"Dynamo could not capture {name}'s decode step in one graph: {exc}") from exc
    graph = graphs[-1].graph
    matches = find_sites(graph, model)
    if not matches:
        updates = find_cache_updates(graph)
        if updates:
            raise UnsupportedModelError(
                f"{module_path(updates[0])} updates a KV cache, but the attention reading it is not one kvsurgery "
                "recognises (scaled_dot_product_attention or matmul -> softmax -> matmul); load the model with "
                "attn_implementation='sdpa' or 'eager'"
            )
        attention = find_attention(graph)
        if not attention:
            raise UnsupportedModelError(
                f"no attention computation found in {name}'s captured graph: expected "
                "scaled_dot_product_attention or matmul -> softmax -> matmul. Load the model with "
                "attn_implementation='sdpa' or 'eager'."
            )
        raise UnsupportedModelError(
            f"{name} computes attention but no attention reads a KV-cache update (checked {len(attention)} "
            "attention computations); kvsurgery compresses the KV cache of decoder-only LMs"
        )
    layers = [m.layer for m in matches]
    expected = list(range(text.num_hidden_layers))
    if layers != expected:
        missing = sorted(set(expected) - set(layers))
        raise UnsupportedModelError(
            f"{name}: found attention sites for layers {layers} but the config has {text.num_hidden_layers} layers "
            f"(missing {missing}); every decoder layer must have a recognisable attention reading the KV cache"
        )
    counts = {k: v for k, v in op_counts(graph).items() if k in ATTENTION_OPS}
    counts["cache updates (torch.cat onto a cache tensor)"] = len(find_cache_updates(graph))
    return Discovery([_site(model, m) for m in matches], counts)
