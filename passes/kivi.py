"""`kivi2` / `kivi4`: KIVI 2- and 4-bit KV cache quantization (Liu et al., 2024, arXiv 2402.02750); docs/quant.md."""

from __future__ import annotations

from dataclasses import dataclass

from kvsurgery.passes.quant import QuantPass

from kvsurgery.reference.quant_codes import QuantSpec
from kvsurgery.reference.quant_layout import QuantLayout
from kvsurgery.registry import register_pass


@register_pass
class KIVI2(QuantPass):
    """KIVI 2-bit: keys per channel over 32-token groups, values per token over 32-channel groups, 128 recent fp."""

    name = "kivi2"

    @dataclass(frozen=True)
    class Options:
        bits: int = 2
        group: int = 32  # tokens per key group (per channel) and channels per value group (per token)
        residual: int = 128  # newest tokens kept in full precision; a multiple of group

        def __post_init__(self):
            if self.residual < self.group:
                raise ValueError(f"residual ({self.residual}) must be at least one group ({self.group} tokens)")
            _layout(self)

    def layout(self) -> QuantLayout:
        return _layout(self.options)


@register_pass
class KIVI4(KIVI2):
    """KIVI 4-bit: keys per channel over 32-token groups, values per token over 32-channel groups, 128 recent fp."""

    name = "kivi4"

    @dataclass(frozen=True)
    class Options(KIVI2.Options):
        bits: int = 4


def _layout(o: KIVI2.Options) -> QuantLayout:
    k = QuantSpec(o.bits, "channel", o.group)
    v = QuantSpec(o.bits, "token", o.group)
    return QuantLayout(k, v, residual=o.residual)
