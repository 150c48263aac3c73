"""`kvsurgery bench --attention`: the decode-attention kernel alone over a full compressed store, against the
device copy bandwidth and against SDPA on the same tokens held densely (GQA). CUDA only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_row(tokens: int, batch: int, n_kv: int, n_q: int, d: int, dtype: torch.dtype, bandwidth: float) -> dict:
    """Kernel µs, GB/s read and its fraction of the copy bandwidth, SDPA µs, for `tokens` per KV head."""
    from triton.testing import do_bench

    device = torch.device("cuda")
    k = torch.randn(batch, n_kv * tokens, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    pos = torch.arange(tokens, device=device, dtype=torch.int32).repeat(n_kv).expand(batch, -1).contiguous()
    start = (torch.arange(n_kv, device=device, dtype=torch.int32) * tokens).expand(batch, -1).contiguous()
    length = torch.full((batch, n_kv), tokens, device=device, dtype=torch.int32)
    seen = torch.tensor(tokens, device=device)
    q = torch.randn(batch, n_q, 1, d, device=device, dtype=dtype)
    scale = d**-0.5
    kernel_ms = do_bench(lambda: torch.ops.kvsurgery.attend(q, k, v, pos, start, length, seen, scale, 0))
    dense_k, dense_v = k.view(batch, n_kv, tokens, d), v.view(batch, n_kv, tokens, d)
    sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(q, dense_k, dense_v, scale=scale, enable_gqa=True))
    read = 2 * k.numel() * k.element_size() + pos.numel() * pos.element_size()
    return dict(
        status="ok",
        tokens_per_kv_head=tokens,
        batch=batch,
        kernel_us=kernel_ms * 1e3,
        read_gbps=read / (kernel_ms * 1e-3) / 1e9,
        of_copy_bandwidth=read / (kernel_ms * 1e-3) / bandwidth,
        sdpa_us=sdpa_ms * 1e3,
        vs_sdpa=sdpa_ms / kernel_ms,
    )


def attention_rows(
    shape: str, contexts: list[int], batches: list[int], device: torch.device, dtype: torch.dtype, bandwidth: float
) -> list[dict]:
    """One row per (tokens per KV head, batch) of the named model shape's attention geometry."""
    from kvsurgery.bench import SHAPES

    if device.type != "cuda":
        return [dict(status="skipped", reason="the Triton decode-attention kernel runs on CUDA (CPU: the reference)")]
    cfg = SHAPES[shape]
    rows = []
    for tokens in contexts:
        for batch in batches:
            geometry = (cfg["num_key_value_heads"], cfg["num_attention_heads"], cfg["head_dim"])
            rows.append(attention_row(tokens, batch, *geometry, dtype, bandwidth))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    return rows
