"""Helpers for tests and examples: tiny random-init models of every supported family, padded batches."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
}


def tiny_config(
    family: str = "llama",
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vocab: int = 128,
    sliding_window: int | None = None,
    **overrides,
):
    """A small config of `family`; Gemma3 alternates sliding and full layers when `sliding_window` is set."""
    config_cls, _ = FAMILIES[family]
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "mistral":
        kwargs["sliding_window"] = sliding_window
    if family == "gemma3":
        kwargs["sliding_window"] = sliding_window or 4096
        pattern = ["sliding_attention", "full_attention"] if sliding_window else ["full_attention"]
        kwargs["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_model(
    family: str = "llama", attn: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32, **config
) -> torch.nn.Module:
    """A randomly initialised (seeded) causal LM of `family` in eval mode."""
    _, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(tiny_config(family, **config)).to(dtype).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    return model


def left_padded_batch(lengths: list[int], vocab: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids [B, max(lengths)] left-padded with id 0, and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : width - n] = 0
        mask[row, : width - n] = 0
    return ids, mask


def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, new: int = 8) -> torch.Tensor:
    """Greedy continuation tokens only ([B, new])."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[:, ids.shape[1] :]
