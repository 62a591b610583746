"""SVD-LLM (Wang et al., 2024): truncation-aware whitening.

With the layer's input Gram matrix ``H = L L^T`` (Cholesky, float64; a diagonal shift when
it is not positive definite, reported as ``whitening_shift``), factor ``W L`` and fold
``L^-1`` into B: each dropped singular value of ``W L`` is then exactly the output error it
costs, so the truncation is the best rank-r approximation for the calibration inputs.
``refit``: then solve A in closed form for the final B (``A = W H B^T (B H B^T)^-1``), which
can only lower that error (it recovers what the shift cost).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..quant.gptq_solve import gptq_quantize
from ..registry import ModuleContext, register
from .core import RankTarget, output_error, quantize_factors, refit_left, store_factors, whitened_factors, whitening_factor


@dataclass(kw_only=True, frozen=True)
class SVDLLM(RankTarget):
    refit: bool = True


@register("svd_llm", SVDLLM, needs=("hessian",), summary="SVD-LLM: SVD of W L (H = L L^T, Cholesky-whitened), each dropped value = its output error")
def svd_llm(ctx: ModuleContext, cfg: SVDLLM) -> None:
    W = ctx.weight
    r = cfg.layer_rank(ctx)
    H = ctx.stats["hessian"].to(W.device)
    wh = whitening_factor(H, ctx.name)
    A, B, S = whitened_factors(W, wh.L, r)
    Hr = H if wh.shift == 0 else wh.L @ wh.L.T  # the shifted Gram matrix when H itself is singular (B H B^T may be too)
    if cfg.refit:
        A = refit_left(W, B, Hr)
    q = None
    if cfg.weights is not None:
        A, B, q = quantize_factors(A, B, cfg.weights, W=W.double(), H=Hr, name=ctx.name, gptq=gptq_quantize if cfg.solver == "gptq" else None)
    store_factors(ctx.module, ctx.record, A, B, args=cfg.weights, qparams=q, whitening_shift=wh.shift, dropped_error=float((S[r:] ** 2).sum()),
                  output_error=output_error(W, A, B, H))  # fmt: skip
