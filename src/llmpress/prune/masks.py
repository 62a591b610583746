"""Mask selection shared by the pruning methods.

A *prune mask* is a bool tensor shaped like the weight, True where the weight is removed.
Scores are "importance": the lowest scores are pruned (magnitude: |w|; OBS/SparseGPT:
w^2 / [H^-1]_jj^2; Wanda: |w| * ||X_j||).
N:M semi-structured sparsity keeps ``n`` non-zeros in every ``m`` consecutive input
columns of each row (2:4, 4:8), the layout sparse tensor cores accelerate.
"""

from __future__ import annotations

import torch

from ..errors import RecipeError, UserError


def validate_pattern(sparsity: float, n: int, m: int) -> None:
    """Check a pruning target: unstructured ``sparsity`` in [0, 1), or ``n`` kept of ``m``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise RecipeError(f"sparsity={sparsity!r}: expected a fraction in [0, 1)")
    for k, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise RecipeError(f"{k}={v!r}: expected a non-negative integer")
    if (n == 0) != (m == 0):
        raise RecipeError(f"n={n}, m={m}: N:M sparsity needs both n (kept per group) and m (group size), or neither")
    if m and not 0 < n < m:
        raise RecipeError(f"n={n}, m={m}: N:M sparsity keeps n of every m weights: need 0 < n < m")


def describe_pattern(sparsity: float, n: int = 0, m: int = 0) -> str:
    return f"{n}:{m}" if m else f"unstructured {sparsity:.0%}"


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``m - n`` lowest scores of every ``m`` consecutive columns of each row."""
    R, C = scores.shape
    if C % m:
        raise UserError(f"N:M sparsity with m={m} needs the input dimension ({C}) to be a multiple of m")
    g = scores.reshape(R, C // m, m)
    idx = torch.topk(g, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(R, C)


def topk_prune_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune exactly the ``k`` lowest scores of the whole tensor (ties broken by position)."""
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, largest=False).indices] = True
    return mask.reshape(scores.shape)


def row_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * cols)`` lowest scores of each row."""
    R, C = scores.shape
    k = int(round(sparsity * C))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def magnitude_prune(weight: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0, per_row: bool = True) -> torch.Tensor:
    """Magnitude pruning (the data-free baseline): zero the smallest |w| per row, overall, or N:M."""
    validate_pattern(sparsity, n, m)
    s = weight.abs().float()
    if m:
        mask = nm_prune_mask(s, n, m)
    elif per_row:
        mask = row_prune_mask(s, sparsity)
    else:
        mask = topk_prune_mask(s, int(round(sparsity * s.numel())))
    return weight.masked_fill(mask, 0)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every ``m`` consecutive columns of every row hold at most ``n`` non-zeros."""
    R, C = weight.shape
    if C % m:
        return False
    return bool(((weight.reshape(R, C // m, m) != 0).sum(-1) <= n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def effective_sparsity(sparsity: float, offset: float | None = None, m: int = 0) -> float:
    """``sparsity`` plus a per-layer ``offset`` (OWL's, from ``ModuleContext.settings``;
    unstructured only: N:M patterns ignore it), clipped to [0, 0.99]."""
    if offset is None or m:
        return sparsity
    return min(max(sparsity + float(offset), 0.0), 0.99)
