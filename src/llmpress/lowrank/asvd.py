"""ASVD (Yuan et al., 2023): activation-aware SVD.

Scale input channel j by s_j = mean|x_j|^alpha (over the calibration tokens), factor
``W diag(s)`` and fold ``diag(s)^-1`` into B: the truncation then keeps what matters for
inputs of typical magnitude. alpha = 0 is plain SVD. With ``alpha`` unset it is chosen per
layer from ``alphas`` by the output error on the calibration tokens,
``tr((W - A B) H (W - A B)^T)`` with H the layer's input Gram matrix (exact, no forward).

``scale: fisher`` (the Fisher variant, as in Fisher-weighted SVD): the channel measure is
``sqrt(sum_i F_ij)`` instead of mean|x_j|, with F the per-weight Fisher diagonal a
``weight_importance`` stage before it measured, so alpha = 1 weighs each input column's
squared error by its Fisher information; alpha is searched the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..quant.gptq_solve import gptq_quantize
from ..registry import ModuleContext, register
from .core import RankTarget, output_error, quantize_factors, scaled_factors, store_factors

MIN_SCALE = 1e-6  # of the largest channel's mean |x|: dead channels keep a finite scale


@dataclass(kw_only=True, frozen=True)
class ASVD(RankTarget):
    alpha: float | None = None  # None: searched per layer over ``alphas``
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    scale: str = "activation"  # "activation": mean|x_j|; "fisher": sqrt(sum_i F_ij) (needs weight_importance)

    @property
    def requires_stage(self) -> str | None:
        return "weight_importance" if self.scale == "fisher" else None

    def __post_init__(self):
        super().__post_init__()
        if self.scale not in ("activation", "fisher"):
            raise UserError(f"asvd scale {self.scale!r}: expected activation or fisher")
        grid = (self.alpha,) if self.alpha is not None else self.alphas
        if not grid or any(not 0 <= a <= 2 for a in grid):
            raise UserError(f"asvd alpha values {list(grid)} must lie in [0, 2]")


def channel_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    m = mean_abs.double()
    return m.clamp_min(MIN_SCALE * float(m.max() or 1.0)).pow(alpha)


@register("asvd", ASVD, needs=("channel_stats", "hessian"), summary="ASVD: SVD of W diag(mean|x|^alpha), alpha searched by output error")
def asvd(ctx: ModuleContext, cfg: ASVD) -> None:
    W = ctx.weight
    r = cfg.layer_rank(ctx)
    H = ctx.stats["hessian"].to(W.device)
    if cfg.scale == "fisher":
        imp = ctx.settings.get("importance")
        if imp is None:
            raise UserError(f"{ctx.name}: asvd scale fisher needs a weight_importance stage before it targeting this linear")
        mean_abs = imp.to(W.device).double().sum(0).sqrt()
    else:
        mean_abs = ctx.stats["channel_stats"]["mean_abs"].to(W.device)
    best = None
    for alpha in (cfg.alpha,) if cfg.alpha is not None else cfg.alphas:
        A, B = scaled_factors(W, channel_scale(mean_abs, alpha), r)
        err = output_error(W, A, B, H)
        if best is None or err < best[0]:
            best = (err, alpha, A, B)
    err, alpha, A, B = best
    q = None
    if cfg.weights is not None:
        A, B, q = quantize_factors(A, B, cfg.weights, W=W.double(), H=H, name=ctx.name, gptq=gptq_quantize if cfg.solver == "gptq" else None)
        err = output_error(W, A, B, H)
    store_factors(ctx.module, ctx.record, A, B, args=cfg.weights, qparams=q, alpha=alpha, output_error=err)
