"""Rank allocation under a total parameter budget (QSVD's importance-based allocation).

Before the engine, on the uncompressed model: each targeted linear's weight is written as
``W = U diag(s) V^T`` and the gradient of the calibration loss with respect to its singular
values is ``dL/ds_i = u_i^T (dL/dW) v_i``, so one backward pass per batch (gradients of the
weights only) scores every singular value of every layer. The importance of singular value i
is its first-order (Taylor) loss change when dropped, ``s_i * sum_batches |dL/ds_i|``
(``score: taylor``; ``score: grad`` drops the ``s_i``).

The budget is ``ratio`` times the targeted linears' parameters. Each singular value costs its
layer's ``m + n`` parameters; values are taken in decreasing importance per parameter while
they fit, and a layer's rank is how many of its values were taken (the factor stage keeps that
many: its own ratio is then ignored). No layer gets a rank that saves nothing or a rank of 0,
so the budget is spent to within one layer's m + n. The ranks travel to the factor stages as
per-linear settings (``rank``) and the report keeps them under ``stages``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..arch import get_module
from ..errors import RecipeError
from ..registry import ModelStageOutput, register
from .core import stage_linears, weight_grads


@dataclass(kw_only=True, frozen=True)
class LowRankAlloc:
    ratio: float = 0.8  # of the targeted linears' parameters, over all of them
    windows: int = 16  # calibration windows for the gradients
    batch_size: int = 2
    score: str = "taylor"  # "taylor": s_i * sum |dL/ds_i|; "grad": sum |dL/ds_i|

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise RecipeError(f"lowrank_alloc ratio {self.ratio} must be in (0, 1)")
        if self.windows < 1 or self.batch_size < 1:
            raise RecipeError("lowrank_alloc windows and batch_size must be at least 1")
        if self.score not in ("taylor", "grad"):
            raise RecipeError(f"lowrank_alloc score {self.score!r}: expected taylor or grad")


def singular_value_grads(model: nn.Module, names: list[str], data: torch.Tensor, cfg: LowRankAlloc) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(singular values, sum over batches of |dL/ds_i|) of each named linear's weight."""
    svds = {n: torch.linalg.svd(get_module(model, n).weight.detach().double(), full_matrices=False) for n in names}
    acc = {n: torch.zeros(svds[n][1].shape[0], dtype=torch.float64) for n in names}
    for grads in weight_grads(model, names, data, cfg.windows, cfg.batch_size):
        for n, g in grads.items():
            U, _, Vh = svds[n]
            acc[n] += ((U.T @ g.double()) * Vh).sum(1).abs()  # u_i^T G v_i for every i
    return {n: (svds[n][1], acc[n]) for n in names}


def allocate(scores: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """Ranks per layer: singular values taken by decreasing score per parameter while the
    budget ``ratio * sum(mn)`` allows; every layer gets at least rank 1 and less than its
    break-even rank."""
    budget = ratio * sum(m * n for m, n in shapes.values())
    cap = {k: max(1, -(-m * n // (m + n)) - 1) for k, (m, n) in shapes.items()}  # largest r with r(m+n) < mn
    ranks = dict.fromkeys(shapes, 1)
    spent = sum(m + n for m, n in shapes.values())
    order = sorted(((float(s) / sum(shapes[k]), k) for k, sc in scores.items() for s in sc[1:]), reverse=True)
    for _, k in order:
        cost = sum(shapes[k])
        if ranks[k] < cap[k] and spent + cost <= budget:
            ranks[k] += 1
            spent += cost
    return ranks


@register(
    "lowrank_alloc",
    LowRankAlloc,
    scope="model",
    summary="rank allocation across layers by singular-value importance (gradients), for the low-rank stages after it",
)
def lowrank_alloc(model: nn.Module, spec, data, stage) -> ModelStageOutput:
    cfg: LowRankAlloc = stage.config
    shapes = stage_linears(model, spec, stage, data, "lowrank_alloc")
    found = singular_value_grads(model, list(shapes), data, cfg)
    # importance of each singular value, sorted as the factor stages keep them (largest s first)
    scores = {n: (s * g if cfg.score == "taylor" else g) for n, (s, g) in found.items()}
    ranks = allocate(scores, shapes, cfg.ratio)
    params = {n: r * sum(shapes[n]) for n, r in ranks.items()}
    total = sum(m * n for m, n in shapes.values())
    return ModelStageOutput(
        per_linear={n: {"rank": r} for n, r in ranks.items()},
        summary={"ratio": cfg.ratio, "spent_ratio": round(sum(params.values()) / total, 6), "ranks": ranks},
    )
