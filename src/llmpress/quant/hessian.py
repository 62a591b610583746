"""Shared pieces of the second-order (OBS family) solvers: Hessian preparation and the
Cholesky factor of its inverse.

The layer-wise problem is ``min ||W X - W_hat X||^2`` with ``H = 2/n X X^T`` (shared by
every row of ``W``). Removing/quantizing weight ``q`` of a row and compensating with the
other weights costs ``(w_q - quant(w_q))^2 / (2 [H^-1]_qq)`` and updates the row by
``delta = -(w_q - quant(w_q)) / [H^-1]_qq * H^-1[q, :]``. When the weights are taken in a
fixed column order 0, 1, ..., the inverse Hessian of the remaining columns after
eliminating 0..i-1 is the trailing block of the row-eliminated matrix, and its row i
divided by sqrt of its diagonal is row i of the *upper Cholesky factor* U of H^-1
(``H^-1 = U^T U``). So one Cholesky replaces all the rank-one eliminations: GPTQ's
reformulation, used by GPTQ and SparseGPT alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 8
DAMP_GROWTH = 10.0


@dataclass(kw_only=True)
class InverseFactor:
    """Upper Cholesky factor of the damped inverse Hessian and what it took to get it."""

    U: torch.Tensor  # [C, C] upper triangular, H_damped^-1 = U^T U
    damp: float  # damping actually used, as a fraction of mean(diag(H))
    retries: int  # how many times the damping had to be raised
    fallback: bool = False  # True when no damping worked and H was replaced by its diagonal


def prepare(
    weight: torch.Tensor, hessian: torch.Tensor, name: str | None = None, owned: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 copies of W [R, C] and H [C, C] on W's device, with dead inputs handled.
    ``owned``: the caller gives ``hessian`` up, so a float32 one on W's device is used in
    place rather than copied (one [C, C] less at the solver's peak).

    A dead input (``H_jj == 0``: the column never sees a non-zero activation in the
    calibration text) keeps its weights, and ``H_jj`` becomes the mean of the live
    diagonal: its row and column of H stay zero, so the solvers quantize it to nearest
    (no error feedback into or out of it), and pruning scores it as an average input.
    The GPTQ reference code sets such columns to 0 instead, which is free on the
    calibration text but an unbounded error on text where the input is alive (a channel
    that fires only on code, say); keeping round-to-nearest bounds it by RTN's error.
    Returns (W, H, dead mask [C]).
    """
    where = f"layer {name}: " if name else ""
    if weight.dim() != 2:
        raise UserError(f"{where}expected a 2-D weight, got shape {tuple(weight.shape)}")
    R, C = weight.shape
    if hessian.shape != (C, C):
        raise UserError(f"{where}Hessian shape {tuple(hessian.shape)} does not match the weight's {C} input columns")
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32)
    if H.data_ptr() == hessian.data_ptr() and not owned:  # .to() made no copy
        H = H.clone()
    if not torch.isfinite(H).all():
        raise UserError(f"{where}the Hessian has non-finite entries (inf/NaN in the calibration activations?)")
    if not torch.isfinite(W).all():
        raise UserError(f"{where}the weight has non-finite entries")
    dead = torch.diagonal(H) == 0
    if dead.any():
        idx = dead.nonzero().squeeze(1)
        live = torch.diagonal(H)[~dead]
        H[idx, idx] = float(live.mean()) if live.numel() else 1.0
    return W, H, dead


def regularize(H: torch.Tensor, *, shrink: float = 0.0, diag_floor: float = 0.0) -> None:
    """The Hessian regularizers, in place on a prepared ``H``: ``shrink`` scales every
    off-diagonal entry by ``1 - shrink`` (``(1 - s) H + s diag(H)``: 0 keeps H, 1 leaves only
    the diagonal, i.e. no error feedback between columns: round-to-nearest), so the solve
    trusts the calibration text's input correlations less; ``diag_floor`` raises every
    ``H_jj`` below ``diag_floor * mean(diag H)`` to it, so inputs rare in the calibration
    text cost as if common (docs/second-order.md, "Regularization")."""
    if shrink:
        d = torch.diagonal(H).clone()
        H.mul_(1.0 - shrink)
        torch.diagonal(H).copy_(d)
    if diag_floor:
        dg = torch.diagonal(H)
        dg.clamp_(min=diag_floor * float(dg.mean()))


def inverse_cholesky(H: torch.Tensor, damp: float, name: str | None = None) -> InverseFactor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising the damping
    (x10 per retry, up to ``MAX_DAMP_RETRIES`` times) when a factorization fails (a singular
    or indefinite H in float32). If none works, H is replaced by ``diag(|diag H|)`` (each
    column then gets no error feedback: round-to-nearest) and ``fallback`` is set.
    """
    C = H.shape[0]
    diag = torch.diagonal(H)
    mean = float(diag.abs().mean()) or 1.0
    idx = torch.arange(C, device=H.device)
    d = float(damp)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        # each [C, C] intermediate is freed as soon as the next exists: at most H and two others
        # alive at once (a 14336-wide down_proj: 0.8 GB per copy in float32)
        Hd = H.clone()
        Hd[idx, idx] += d * mean
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info2) == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning(
                        "%sCholesky failed at lower damping; succeeded with damp=%.3g after %d retr%s",
                        f"{name}: " if name else "",
                        d,
                        attempt,
                        "y" if attempt == 1 else "ies",
                    )
                return InverseFactor(U=U, damp=d, retries=attempt)
        d = d * DAMP_GROWTH if d > 0 else 0.01
    log.warning(
        "%sno damping up to %.3g made the Hessian positive definite; falling back to its diagonal (no error feedback)",
        f"{name}: " if name else "",
        d / DAMP_GROWTH,
    )
    dg = diag.abs()
    dg = torch.where(dg > 0, dg, torch.ones_like(dg))
    U = torch.diag(dg.rsqrt())
    return InverseFactor(U=U, damp=d / DAMP_GROWTH, retries=MAX_DAMP_RETRIES + 1, fallback=True)


def layer_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: with H = 2/n X X^T this is 2/n ||W X - W_hat X||^2."""
    D = (weight - new_weight).double()
    return float(((D @ hessian.double()) * D).sum())
