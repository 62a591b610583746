"""Truncated SVD (no data): W ~ A B with A = U_r S_r^1/2, B = S_r^1/2 V_r^T.

Keeps the r largest singular values of the weight itself: optimal for the weight's
Frobenius error, blind to which inputs matter (the seeds' "problem of SVD": the error that
counts is the output's, ||(W - A B) X||)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..registry import ModuleContext, register
from .core import RankTarget, quantize_factors, store_factors, svd_factors


@dataclass(kw_only=True, frozen=True)
class SVD(RankTarget):
    def __post_init__(self):
        super().__post_init__()
        if self.solver == "gptq":
            raise UserError("svd uses no calibration data: factor solver gptq needs the layer's input statistics (use svd_llm or asvd)")


@register("svd", SVD, summary="truncated SVD: W ~ A B at a target parameter ratio (no data)")
def svd(ctx: ModuleContext, cfg: SVD) -> None:
    r = cfg.layer_rank(ctx)
    A, B, S = svd_factors(ctx.weight, r)
    q = None
    if cfg.weights is not None:
        A, B, q = quantize_factors(A, B, cfg.weights, name=ctx.name)
    store_factors(ctx.module, ctx.record, A, B, args=cfg.weights, qparams=q, kept_energy=round(float((S[:r] ** 2).sum() / (S**2).sum()), 6))
