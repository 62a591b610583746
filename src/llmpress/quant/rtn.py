"""Round-to-nearest: quantize each weight independently (no data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..quant.args import QuantArgs
from ..quant.core import quantize_weight
from ..registry import ModuleContext, register


@dataclass(frozen=True)
class RTN:
    weights: QuantArgs | None = field(default_factory=QuantArgs)
    activations: QuantArgs | None = None


@register("rtn", RTN, summary="round-to-nearest weight quantization (optionally dynamic activation quantization)")
def rtn(ctx: ModuleContext, cfg: RTN) -> None:
    if cfg.weights is not None:
        w, qp = quantize_weight(ctx.weight, cfg.weights, ctx.name)
        ctx.set_weight(w)
        ctx.record.weight_args = cfg.weights
        ctx.record.qparams = qp
    if cfg.activations is not None:
        ctx.record.act_args = cfg.activations
