"""Optimal Brain Surgeon / Optimal Brain Quantizer: the exact one-weight-at-a-time reference.

For each row w of W (rows are independent: the error ||W X - W_hat X||^2 is a sum over
rows, all with the same Hessian H = 2/n X X^T), repeat:

- score every remaining weight: pruning ``w_i^2 / [H^-1]_ii`` (OBS), quantization
  ``(quant(w_i) - w_i)^2 / [H^-1]_ii`` (OBQ); take the smallest (or the next one of a
  given ``order``);
- set it (to 0 or to its grid value) and compensate the remaining weights with
  ``delta = -(w_q - target) / [H^-1]_qq * H^-1[:, q]``;
- remove q from the inverse Hessian with the elimination lemma
  ``H^-1 <- H^-1 - H^-1[:, q] H^-1[q, :] / [H^-1]_qq``.

O(rows * cols^2) per removed weight in float64: only for small matrices (a test oracle).
GPTQ equals OBQ with a fixed column order shared by all rows (and the grid fixed before
the loop); OBQ's greedy order per row is usually a little better, never guaranteed.
"""

from __future__ import annotations

import torch

from .args import QuantArgs
from .core import QParams, compute_qparams, fake_quantize


def _inverse(H: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(H.double())


def _eliminate(w: torch.Tensor, Hinv: torch.Tensor, q: int, target: float) -> None:
    """In place: set w[q] to target, compensate the others, drop q from Hinv."""
    d = Hinv[q, q]
    col = Hinv[:, q].clone()
    w -= (w[q] - target) / d * col
    w[q] = target
    Hinv -= torch.outer(col, Hinv[q, :]) / d
    Hinv[q, :] = 0
    Hinv[:, q] = 0


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, float]:
    """Greedy OBS pruning of ``round(sparsity * cols)`` weights in every row.

    Returns (pruned weight, OBS-predicted error sum of w_q^2 / (2 [H^-1]_qq)).
    ``hessian`` must be positive definite (damp it first).
    """
    W = weight.double().clone()
    R, C = W.shape
    k = int(round(sparsity * C))
    Hinv0 = _inverse(hessian)
    loss = 0.0
    for r in range(R):
        w = W[r]
        Hinv = Hinv0.clone()
        alive = torch.ones(C, dtype=torch.bool)
        for _ in range(k):
            dg = torch.diagonal(Hinv)
            score = torch.where(alive, w.pow(2) / dg.clamp_min(1e-300), torch.inf)
            q = int(torch.argmin(score))
            loss += float(w[q] ** 2 / (2 * dg[q]))
            _eliminate(w, Hinv, q, 0.0)
            alive[q] = False
    return W.to(weight.dtype), loss


def obq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    qparams: QParams | None = None,
    order: torch.Tensor | list[int] | None = None,
) -> tuple[torch.Tensor, QParams, float]:
    """OBQ: quantize every weight of every row, one at a time, greedily (or in ``order``).

    The grid (``qparams``, default: from the original weight) is fixed before the loop.
    Returns (dequantized weight, qparams, predicted error).
    """
    if qparams is None:
        qparams = compute_qparams(weight.float(), args)
    W = weight.double().clone()
    R, C = W.shape
    Hinv0 = _inverse(hessian)
    loss = 0.0
    order = None if order is None else [int(i) for i in order]

    def row_params(r: int) -> QParams:
        if qparams.scale.shape[0] == 1:  # per-tensor
            return qparams
        pick = lambda t: None if t is None else t[r : r + 1]  # noqa: E731
        return QParams(scale=qparams.scale[r : r + 1], zero_point=pick(qparams.zero_point), threshold=pick(qparams.threshold))

    for r in range(R):
        w = W[r]
        Hinv = Hinv0.clone()
        alive = torch.ones(C, dtype=torch.bool)
        qp = row_params(r)
        for step in range(C):
            target_all = fake_quantize(w.float().unsqueeze(0), args, qp).double().squeeze(0)
            dg = torch.diagonal(Hinv)
            if order is None:
                score = torch.where(alive, (target_all - w).pow(2) / dg.clamp_min(1e-300), torch.inf)
                q = int(torch.argmin(score))
            else:
                q = order[step]
            loss += float((target_all[q] - w[q]) ** 2 / (2 * dg[q]))
            _eliminate(w, Hinv, q, float(target_all[q]))
            alive[q] = False
    return W.to(weight.dtype), qparams, loss


def obs_fixed_mask(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, order=None) -> torch.Tensor:
    """Sequential OBS with a given prune mask: visit the columns in ``order`` (default
    0, 1, ...); each is set to 0 where masked, else kept at its current value, and then
    eliminated (frozen) -- what SparseGPT computes, one weight at a time in float64."""
    W = weight.double().clone()
    R, C = W.shape
    Hinv0 = _inverse(hessian)
    order = list(range(C)) if order is None else [int(i) for i in order]
    for r in range(R):
        w = W[r]
        Hinv = Hinv0.clone()
        for q in order:
            _eliminate(w, Hinv, q, 0.0 if bool(mask[r, q]) else float(w[q]))
    return W.to(weight.dtype)


def optimal_reconstruction(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The best weights for a given prune mask: per row, least squares over the kept
    weights, ``v_K = H_KK^-1 H_K: w`` (the lower bound of any method using that mask)."""
    W = weight.double()
    Hd = hessian.double()
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        k = ~mask[r].bool()
        if k.any():
            out[r, k] = torch.linalg.solve(Hd[k][:, k], Hd[k] @ W[r])
    return out.to(weight.dtype)
