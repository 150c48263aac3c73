"""Low-bit quantization of keys and values: specs, range fitting, quantize/dequantize and bit packing.

Asymmetric uniform quantization (KIVI, CalibQuant): a group of values with range [lo, hi] gets
`scale = (hi - lo) / (2**bits - 1)` and `code = round(clamp((x - lo) / scale, 0, 2**bits - 1))`; it is read back
as `x̂ = code * scale + lo`. The stored `scale` and `lo` are in the model's dtype, and the codes are computed from
those stored (rounded) values, so `|x - x̂| <= scale / 2` holds exactly for every x inside [lo, lo + levels * scale]
(float rounding aside). Values outside it (a shrunk or quantile range) are clipped to the nearest end.

A group is either `axis="channel"`: one (scale, lo) per channel over `group` consecutive tokens (KIVI keys;
`group=0` = over the head's whole quantized span, CalibQuant), or `axis="token"`: one per token over `group`
consecutive channels (KIVI values). Codes are packed along the channel axis, 8 // bits codes per byte, low bits first.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (1, 2, 4)
RANGES = ("minmax", "quantile")
AXES = ("channel", "token")
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantSpec:
    """How one of K or V is quantized (see the module docstring). `text()` is the form custom ops carry."""

    bits: int
    axis: str = "channel"
    group: int = 0  # tokens per group (channel axis; 0 = the whole quantized span) or channels per group (token axis)
    range: str = "minmax"  # "minmax" or "quantile" (lo, hi = the alpha and 1 - alpha quantiles of the group)
    alpha: float = 0.0
    shrink: float = 1.0  # lo and hi are multiplied by this (CalibQuant's range calibration; 1 = none)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.group < 0 or (self.axis == "token" and self.group == 0):
            raise ValueError(f"group must be > 0 (or 0 = whole span on the channel axis), got {self.group}")
        if self.range not in RANGES:
            raise ValueError(f"range must be one of {RANGES}, got {self.range!r}")
        if not 0.0 <= self.alpha < 0.5:
            raise ValueError(f"alpha (the quantile cut) must be in [0, 0.5), got {self.alpha}")
        if not 0.0 < self.shrink <= 1.0:
            raise ValueError(f"the range shrink factor must be in (0, 1], got {self.shrink}")

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def packed_width(self, dim: int) -> int:
        """Bytes of one token's packed codes."""
        return dim * self.bits // 8

    def check_dim(self, dim: int, what: str) -> None:
        """Raise ValueError when a head dimension cannot be packed or grouped with this spec."""
        if (dim * self.bits) % 8:
            raise ValueError(f"{what} head_dim {dim} x {self.bits} bits is not a whole number of bytes")
        if self.axis == "token" and dim % self.group:
            raise ValueError(
                f"group size {self.group} does not divide {what} head_dim {dim}; use a divisor of {dim}, "
                f"e.g. group={math.gcd(dim, self.group)}"
            )

    def text(self) -> str:
        return f"{self.bits},{self.axis},{self.group},{self.range},{self.alpha!r},{self.shrink!r}"

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def parse(text: str) -> QuantSpec:
        bits, axis, group, rng, alpha, shrink = text.split(",")
        return QuantSpec(int(bits), axis, int(group), rng, float(alpha), float(shrink))


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (tests); everything else is quantized and dequantized in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# -- packing ----------------------------------------------------------------------------------------------
def _shifts(bits: int, device) -> Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Codes [..., D] (uint8, each < 2**bits) -> packed bytes [..., D * bits // 8]."""
    per_byte = 8 // bits
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    return (grouped << _shifts(bits, codes.device)).sum(-1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Packed bytes [..., W] -> codes [..., W * 8 // bits] (uint8)."""
    mask = (1 << bits) - 1
    codes = (packed[..., None] >> _shifts(bits, packed.device)) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


# -- range fitting and (de)quantization over groups -------------------------------------------------------
def fit_range(x: Tensor, valid: Tensor, dim: int, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(lo, hi) of each group: reduce `x` over `dim`, counting only `valid` entries (broadcast to x).

    Groups without any valid entry get lo = hi = 0.
    """
    valid = valid.expand_as(x)
    if spec.range == "quantile" and spec.alpha > 0:
        masked = x.masked_fill(~valid, float("nan"))
        lo = torch.nanquantile(masked, spec.alpha, dim=dim, keepdim=True)
        hi = torch.nanquantile(masked, 1.0 - spec.alpha, dim=dim, keepdim=True)
    else:
        lo = x.masked_fill(~valid, float("inf")).amin(dim=dim, keepdim=True)
        hi = x.masked_fill(~valid, float("-inf")).amax(dim=dim, keepdim=True)
    any_valid = valid.any(dim=dim, keepdim=True)
    lo = torch.where(any_valid, lo, 0.0) * spec.shrink
    hi = torch.where(any_valid, hi, 0.0) * spec.shrink
    return lo, hi


def quantize_range(x: Tensor, lo: Tensor, hi: Tensor, bits: int, stat_dtype: torch.dtype):
    """Codes (uint8) of x for ranges [lo, hi] (broadcast), and the stored (scale, lo) in `stat_dtype`."""
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).to(stat_dtype)
    low = lo.to(stat_dtype)
    dt = compute_dtype(x)
    s, m = scale.to(dt), low.to(dt)
    code = ((x.to(dt) - m) / torch.where(s > 0, s, 1.0)).clamp(0, levels).round()
    code = torch.where(s > 0, code, 0.0)
    return code.to(torch.uint8), scale, low


def dequantize(codes: Tensor, scale: Tensor, low: Tensor, dtype: torch.dtype) -> Tensor:
    """x̂ = code * scale + lo, computed in `dtype`."""
    return codes.to(dtype) * scale.to(dtype) + low.to(dtype)


def _grouped(x: Tensor, valid: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, int]:
    """View tokens [..., N, D] as groups [..., n_groups, size, D] (channel axis) or [..., N, D / g, g] (token axis)
    with the reduction dim; N must be a multiple of the token group (channel axis, group > 0)."""
    *lead, n, d = x.shape
    if spec.axis == "token":
        g = spec.group
        return x.reshape(*lead, n, d // g, g), valid[..., None, None].expand(*lead, n, 1, 1), -1
    if spec.group == 0:
        return x[..., None, :, :], valid[..., None, :, None], -2
    g = spec.group
    return x.reshape(*lead, n // g, g, d), valid.reshape(*lead, n // g, g, 1), -2


def stats_shape(spec: QuantSpec, n: int, dim: int) -> tuple[int, int]:
    """Shape of the (scale, lo) rows for `n` tokens of `dim` channels: [groups or tokens, channels or groups]."""
    if spec.axis == "token":
        return n, dim // spec.group
    return (1 if spec.group == 0 else n // spec.group), dim


def quantize_tokens(x: Tensor, valid: Tensor, spec: QuantSpec, stat_dtype: torch.dtype):
    """Quantize tokens x [..., N, D] (invalid ones ignored by the ranges) -> codes [..., N, D] (uint8, unpacked),
    scale and lo [..., *stats_shape(spec, N, D)] in `stat_dtype`."""
    groups, mask, dim = _grouped(x.to(compute_dtype(x)), valid, spec)
    lo, hi = fit_range(groups, mask, dim, spec)
    codes, scale, low = quantize_range(groups, lo, hi, spec.bits, stat_dtype)
    shape = stats_shape(spec, x.shape[-2], x.shape[-1])
    lead = x.shape[:-2]
    return codes.reshape(x.shape), scale.reshape(*lead, *shape), low.reshape(*lead, *shape)


def dequantize_tokens(codes: Tensor, scale: Tensor, low: Tensor, spec: QuantSpec, dtype: torch.dtype) -> Tensor:
    """Inverse of `quantize_tokens`: codes [..., N, D], stats [..., *stats_shape] -> x̂ [..., N, D] in `dtype`."""
    *lead, n, d = codes.shape
    if spec.axis == "token":
        g = spec.group
        out = dequantize(codes.reshape(*lead, n, d // g, g), scale[..., None], low[..., None], dtype)
        return out.reshape(*lead, n, d)
    size = n if spec.group == 0 else spec.group
    grouped = codes.reshape(*lead, n // size, size, d)
    return dequantize(grouped, scale[..., None, :], low[..., None, :], dtype).reshape(*lead, n, d)


def squeeze_logits(logits: Tensor, valid: Tensor, squeeze: float) -> Tensor:
    """CalibQuant's logit calibration: map each row's [min, max] over `valid` entries to [min, max - squeeze].

    A row whose spread is below `squeeze` is collapsed to its minimum instead of being inverted (the authors'
    formula flips the order there). `squeeze <= 0` returns the logits unchanged.
    """
    if squeeze <= 0 or logits.shape[-1] == 0:
        return logits
    lo = logits.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    hi = logits.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    lo, hi = torch.where(valid.any(-1, keepdim=True), lo, 0.0), torch.where(valid.any(-1, keepdim=True), hi, 0.0)
    spread = hi - lo
    factor = (spread - squeeze).clamp_min(0.0) / (spread + 1e-8)
    return torch.where(valid, (logits - lo) * factor + lo, logits)
