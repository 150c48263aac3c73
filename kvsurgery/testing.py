"""Helpers for tests and examples: tiny random-init models of every supported family, padded batches."""

from __future__ import annotations

import ctypes
import gc
import os

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


# -- tiny vision-language models (random init, no download, no processor) ----------------------------------------
IMAGE_TOKEN = 125  # the image placeholder id of the tiny VLMs (inside their 128-token vocabulary)


def tiny_vlm(kind: str = "llava", layers: int = 2, seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    """A LLaVA- or Qwen2-VL-style model: a one-layer random vision tower around a tiny language model.

    kind "llava": CLIP tower on 16x16 images, 4x4 patches -> 16 image tokens per image.
    kind "qwen2_vl": Qwen2-VL tower; an image of grid (1, 4, 8) patches of 2x2 -> 8 tokens (2x2 merge), M-RoPE.
    Both are untrained: the image tokens carry random features (enough to exercise the plumbing, not quality).
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llava":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_index=IMAGE_TOKEN,
            image_seq_length=16,
            vision_feature_layer=-1,
        )
        model = LlavaForConditionalGeneration(config)
    elif kind == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision = dict(
            depth=1,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            patch_size=2,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_TOKEN,
            video_token_id=126,
            vision_start_token_id=123,
            vision_end_token_id=124,
        )
        model = Qwen2VLForConditionalGeneration(config)
    else:
        raise ValueError(f"kind must be 'llava' or 'qwen2_vl', got {kind!r}")
    model = model.eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    return model


def image_prompt(model: torch.nn.Module, before: int = 6, after: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    """generate()/forward() inputs of one prompt: `before` text tokens, one image, `after` text tokens (batch 1)."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 120, (1, before + after), generator=gen)
    if model.config.model_type == "llava":
        image = torch.full((1, model.config.image_seq_length), IMAGE_TOKEN)
        ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
        pixels = torch.randn(1, 3, 16, 16, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    grid = torch.tensor([[1, 4, 8]])  # 32 patches of 3 x 2 x 2 x 2 values -> 8 tokens after the 2x2 merge
    image = torch.cat([torch.tensor([[123]]), torch.full((1, 8), IMAGE_TOKEN), torch.tensor([[124]])], dim=1)
    ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
    pixels = torch.randn(32, 3 * 2 * 2 * 2, generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_grid_thw": grid,
        "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
    }


def _trim_heap() -> None:
    """With glibc, hand the heap's free pages back to the OS; elsewhere nothing."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def collect_garbage(rounds: int = 8) -> None:
    """Collect until a collection finds nothing: finalizers run by one (a deleted model's surgery releasing its
    compiled state) free more for the next."""
    for _ in range(rounds):
        if not gc.collect():
            return


def resident_mib() -> float:
    """This process's resident memory (RSS) in MiB after collecting all garbage and, with glibc, after handing
    the heap's free pages back to the OS (so RSS counts what is live, not what malloc keeps); Linux (/proc) only."""
    collect_garbage()
    _trim_heap()
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
