"""Weighted SVD (the seeds' WSVD): minimize the importance-weighted reconstruction error.

Each element of W matters differently to the loss, so the problem is

    min_{A, B}  sum_ij a_ij (W_ij - (A B)_ij)^2,   A [m, r], B [r, n]

with ``a_ij`` the importance a ``weight_importance`` stage before it measured (the Fisher
diagonal, or the squared first-order score |dL/dW_ij|). With element-wise weights it has no
closed form (a weighted low-rank approximation), so, as the seeds say, A and B are trained by
gradient descent (Adam, ``steps`` full-batch steps, learning rate ``lr`` times the factors'
RMS) from the truncated SVD (A = U_r S_r^1/2, B = S_r^1/2 V_r^T); the best iterate by the
weighted error is kept, so the result is never worse than the SVD for that objective.
``a`` is normalized to mean 1 and floored at ``floor`` (a weight no calibration gradient
touched still costs something). Notes: the weighted error of the SVD start and of the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..registry import ModuleContext, register
from .core import RankTarget, quantize_factors, store_factors, svd_factors


@dataclass(kw_only=True, frozen=True)
class WSVD(RankTarget):
    steps: int = 200
    lr: float = 0.01
    floor: float = 1e-3  # of the mean importance

    requires_stage = "weight_importance"  # the plan refuses wsvd without one before it on the same linear

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 0 or not self.lr > 0 or not 0 <= self.floor < 1:
            raise UserError(f"wsvd steps={self.steps} (>= 0), lr={self.lr} (> 0), floor={self.floor} (in [0, 1)) out of range")
        if self.solver == "gptq":
            raise UserError("wsvd: solver gptq needs the factors' input statistics, which wsvd does not gather; use solver: rtn")


def weighted_factors(W: torch.Tensor, a: torch.Tensor, r: int, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A, B, weighted error of the SVD start, of the result): Adam on sum a (W - A B)^2 / sum a."""
    with torch.enable_grad():  # the engine runs without autograd
        return _descend(W.float(), (a / a.sum()).float(), r, steps, lr)


def _descend(W: torch.Tensor, a: torch.Tensor, r: int, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    A0, B0, _ = svd_factors(W, r)
    A = A0.float().clone().requires_grad_(True)
    B = B0.float().clone().requires_grad_(True)

    def loss_of(A, B):
        return ((W - A @ B).pow(2) * a).sum()

    scale = float(torch.cat([A.detach().flatten(), B.detach().flatten()]).pow(2).mean().sqrt())
    opt = torch.optim.Adam([A, B], lr=lr * scale)
    start, best = None, (float("inf"), None, None)
    for t in range(steps + 1):
        loss = loss_of(A, B)
        v = float(loss.detach())
        start = v if start is None else start
        if v < best[0]:
            best = (v, A.detach().clone(), B.detach().clone())
        if t == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return best[1], best[2], start, best[0]


@register("wsvd", WSVD, summary="weighted SVD: A, B trained by gradient descent on the importance-weighted error (after weight_importance)")
def wsvd(ctx: ModuleContext, cfg: WSVD) -> None:
    W = ctx.weight
    r = cfg.layer_rank(ctx)
    imp = ctx.settings.get("importance")
    if imp is None:
        raise UserError(f"{ctx.name}: wsvd needs a weight_importance stage before it targeting this linear")
    a = imp.to(W.device).float()
    a = a / a.mean().clamp_min(1e-30)
    a = a.clamp_min(cfg.floor)
    A, B, start, final = weighted_factors(W, a, r, cfg.steps, cfg.lr)
    q = None
    if cfg.weights is not None:
        A, B, q = quantize_factors(A, B, cfg.weights, name=ctx.name)
    store_factors(ctx.module, ctx.record, A, B, args=cfg.weights, qparams=q, weighted_error_svd=start, weighted_error=final)
