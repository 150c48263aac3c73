"""`kvsurgery bench --attention`: the decode-attention kernels alone, against the device copy bandwidth and against
SDPA on the same tokens held densely in the model's dtype (GQA). CUDA only.

Per (tokens per KV head, batch): the dense kernel (`attend`) over a full store, then the fused-dequantization kernel
(`attend_quantized`) over a store of the same number of tokens laid out as each quantization recipe's defaults lay
them out (packed codes + the recipe's full-precision residual/recent tokens). Every row reports the bytes the kernel
must read and their ratio to the dense row's bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsurgery.reference.quant_layout import QuantLayout

# 2/4-bit KIVI (keys per channel over 32 tokens, values per token over 32 channels, 128-token residual), KIVI 2-bit
# with 128-wide groups, 2/1-bit CalibQuant (per-channel statistics over the span, logit calibration, 32 recent tokens)
QUANT_RECIPES = ("kivi2", "kivi2(group=128)", "kivi4", "quant2bit", "quant1bit")


def split_recipes(text: str) -> tuple[str, ...]:
    """Comma-separated recipes; commas inside a pass's parentheses belong to its options."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return tuple(p.strip() for p in (*parts, current) if p.strip())


def recipe_layout(text: str) -> tuple[QuantLayout, float]:
    """(layout, logit squeeze) of the quantization pass of a recipe such as "kivi2" or "kivi2(group=128)"."""
    from kvsurgery.manager import build_recipe
    from kvsurgery.passes.quant import QuantPass

    quant = next(p for p in build_recipe(text).passes if isinstance(p, QuantPass))
    return quant.layout(), quant.squeeze


def _timing(fn) -> float:
    """Milliseconds per call (triton's do_bench: warm-up, L2 flush between calls, median)."""
    from triton.testing import do_bench

    return do_bench(fn)


def _row(kernel: str, tokens: int, batch: int, ms: float, read: int, dense_read: int, sdpa_ms: float, bw: float):
    return dict(
        status="ok",
        kernel=kernel,
        tokens_per_kv_head=tokens,
        batch=batch,
        kernel_us=ms * 1e3,
        bytes_read=read,
        of_dense_bytes=read / dense_read,
        read_gbps=read / (ms * 1e-3) / 1e9,
        of_copy_bandwidth=read / (ms * 1e-3) / bw,
        sdpa_us=sdpa_ms * 1e3,
        vs_sdpa=sdpa_ms / ms,
    )


def quantized_store(lay: QuantLayout, tokens: int, batch: int, n_kv: int, d: int, dtype: torch.dtype, device):
    """A full quantized store of `tokens` per KV head: random codes and statistics for the packed share, random
    full-precision keys/values for the layout's dense share (KIVI residual or CalibQuant recent tokens)."""
    dense = min(tokens, lay.residual or lay.recent)
    packed = (tokens - dense) // lay.align * lay.align
    dense = tokens - packed
    planes = {}
    for prefix, spec in (("qk", lay.k), ("qv", lay.v)):
        rows, width = QuantLayout.stats_rows(spec, n_kv, n_kv * packed, d)
        planes[f"{prefix}_codes"] = torch.randint(
            0, 256, (batch, n_kv * packed, spec.packed_width(d)), device=device, dtype=torch.uint8
        )
        planes[f"{prefix}_scale"] = torch.rand(batch, rows, width, device=device, dtype=dtype) * 0.1
        planes[f"{prefix}_low"] = torch.randn(batch, rows, width, device=device, dtype=dtype)
    heads = torch.arange(n_kv, device=device, dtype=torch.int32)
    k = torch.randn(batch, n_kv * dense, d, device=device, dtype=dtype)
    store = dict(
        k_store=k,
        v_store=torch.randn_like(k),
        pos=torch.arange(dense, device=device, dtype=torch.int32).repeat(n_kv).expand(batch, -1).contiguous(),
        start=(heads * dense).expand(batch, -1).contiguous(),
        length=torch.full((batch, n_kv), dense, device=device, dtype=torch.int32),
        seen=torch.tensor(tokens, device=device),
        **planes,
        q_start=(heads * packed).expand(batch, -1).contiguous(),
        q_len=torch.full((batch, n_kv), packed, device=device, dtype=torch.int32),
    )
    return store, packed, dense


def dense_row(tokens, batch, n_kv, q, dtype, bandwidth, device, timing) -> dict:
    """The dense kernel over a full store of `tokens` per KV head, and SDPA over the same tokens."""
    d = q.shape[-1]
    k = torch.randn(batch, n_kv * tokens, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    pos = torch.arange(tokens, device=device, dtype=torch.int32).repeat(n_kv).expand(batch, -1).contiguous()
    start = (torch.arange(n_kv, device=device, dtype=torch.int32) * tokens).expand(batch, -1).contiguous()
    length = torch.full((batch, n_kv), tokens, device=device, dtype=torch.int32)
    seen = torch.tensor(tokens, device=device)
    scale = d**-0.5
    kernel_ms = timing(lambda: torch.ops.kvsurgery.attend(q, k, v, pos, start, length, seen, scale, 0))
    dense_k, dense_v = k.view(batch, n_kv, tokens, d), v.view(batch, n_kv, tokens, d)
    sdpa_ms = timing(lambda: F.scaled_dot_product_attention(q, dense_k, dense_v, scale=scale, enable_gqa=True))
    read = 2 * k.numel() * k.element_size() + pos.numel() * pos.element_size()
    name = f"attend ({str(dtype).removeprefix('torch.')})"
    return _row(name, tokens, batch, kernel_ms, read, read, sdpa_ms, bandwidth)


def attention_group(
    tokens: int,
    batch: int,
    n_kv: int,
    n_q: int,
    d: int,
    dtype: torch.dtype,
    bandwidth: float,
    quant: tuple[str, ...],
    device: torch.device | None = None,
    timing=_timing,
) -> list[dict]:
    """The dense kernel row and one row per quantization recipe, for `tokens` per KV head (CUDA unless `device`)."""
    from kvsurgery.kernels.quant_attention import bytes_read

    device = device or torch.device("cuda")
    q = torch.randn(batch, n_q, 1, d, device=device, dtype=dtype)
    dense = dense_row(tokens, batch, n_kv, q, dtype, bandwidth, device, timing)
    rows = [dense]
    for name in quant:
        lay, squeeze = recipe_layout(name)
        store, packed, n_dense = quantized_store(lay, tokens, batch, n_kv, d, dtype, device)
        args = (q, *store.values(), d**-0.5, lay.text(), squeeze)
        ms = timing(lambda args=args: torch.ops.kvsurgery.attend_quantized(*args))
        read = bytes_read(lay, packed, n_dense, n_kv, d, batch, q.element_size(), q.element_size(), squeeze)
        row = _row(
            f"attend_quantized {name}", tokens, batch, ms, read, dense["bytes_read"], dense["sdpa_us"] / 1e3, bandwidth
        )
        rows.append(dict(row, bits=lay.k.bits, packed_tokens=packed, full_precision_tokens=n_dense))
    return rows


def attention_rows(
    cfg: dict,
    contexts: list[int],
    batches: list[int],
    device: torch.device,
    dtype: torch.dtype,
    bandwidth: float,
    quant: tuple[str, ...] = QUANT_RECIPES,
) -> list[dict]:
    """Rows per (tokens per KV head, batch) of the attention geometry of a model shape (its config keywords)."""
    if device.type != "cuda":
        return [dict(status="skipped", reason="the Triton decode-attention kernels run on CUDA (CPU: the reference)")]
    rows = []
    for tokens in contexts:
        for batch in batches:
            geometry = (cfg["num_key_value_heads"], cfg["num_attention_heads"], cfg["head_dim"])
            group = attention_group(tokens, batch, *geometry, dtype, bandwidth, quant)
            print(attention_table(group, header=not rows), flush=True)
            rows += group
            torch.cuda.empty_cache()
    return rows


COLUMNS = (
    ("kernel", "kernel", "{}"),
    ("tokens", "tokens_per_kv_head", "{}"),
    ("B", "batch", "{}"),
    ("µs", "kernel_us", "{:.1f}"),
    ("MB read", "bytes_read", "{:.1f}"),
    ("of dense bytes", "of_dense_bytes", "{:.3f}"),
    ("GB/s", "read_gbps", "{:.0f}"),
    ("of copy bw", "of_copy_bandwidth", "{:.2f}"),
    ("SDPA µs", "sdpa_us", "{:.1f}"),
    ("vs SDPA", "vs_sdpa", "{:.2f}"),
)


def attention_table(rows: list[dict], header: bool = True) -> str:
    """Markdown rows of the attention benchmark (MB = 1e6 bytes)."""
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        values = [row[key] / 1e6 if key == "bytes_read" else row[key] for _, key, _ in COLUMNS]
        lines.append("| " + " | ".join(fmt.format(v) for (_, _, fmt), v in zip(COLUMNS, values, strict=True)) + " |")
    return "\n".join(lines if header else lines[2:])
