"""`quant1bit` / `quant2bit`: 1-bit (visual) KV quantization, CalibQuant (arXiv 2502.14882 v2), with the
v1 group-specific and quantile-based options; docs/quant.md."""

from __future__ import annotations

from dataclasses import dataclass

from kvsurgery.passes.quant import QuantPass

from kvsurgery.reference.quant_codes import QuantSpec
from kvsurgery.reference.quant_layout import QuantLayout
from kvsurgery.registry import register_pass


@register_pass
class Quant1Bit(QuantPass):
    """1-bit KV: per-channel codes of the prompt's kept (visual) tokens, shrunk ranges, logit calibration at decode.

    Without a modality mask every kept prompt token is quantized except the `recent` newest; with one (a pass
    providing the "is_visual" product, e.g. csp), text tokens take those full-precision slots first. Decoded tokens
    stay in full precision, as in CalibQuant.
    """

    name = "quant1bit"
    uses_modality = True

    @dataclass(frozen=True)
    class Options:
        bits: int = 1
        group: int = 0  # tokens per channel group; 0 = one group over each head's quantized span (CalibQuant)
        range: str = "minmax"  # "minmax" or "quantile" (cut `alpha` from each end, the v1 quantile-based range)
        alpha: float = 0.0
        shrink_k: float = 0.5  # CalibQuant's range factors at 1 bit (the range's ends are multiplied by them)
        shrink_v: float = 0.3
        squeeze: float = 3.0  # packed logits' max lowered by this many nats (0 = no calibration)
        recent: int = 32  # newest kept prompt tokens that stay in full precision

        def __post_init__(self):
            if self.squeeze < 0:
                raise ValueError(f"squeeze must be >= 0, got {self.squeeze}")
            _layout(self)

    @property
    def squeeze(self) -> float:
        return self.options.squeeze

    def layout(self) -> QuantLayout:
        return _layout(self.options)


@register_pass
class Quant2Bit(Quant1Bit):
    """2-bit KV: CalibQuant's quantizer at 2 bits (per-channel min-max codes, logit calibration at decode)."""

    name = "quant2bit"

    @dataclass(frozen=True)
    class Options(Quant1Bit.Options):
        bits: int = 2
        shrink_k: float = 1.0
        shrink_v: float = 1.0


def _layout(o: Quant1Bit.Options) -> QuantLayout:
    k = QuantSpec(o.bits, "channel", o.group, o.range, o.alpha, o.shrink_k)
    v = QuantSpec(o.bits, "channel", o.group, o.range, o.alpha, o.shrink_v)
    return QuantLayout(k, v, recent=o.recent)
