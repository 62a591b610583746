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

``joint: qkv`` allocates for QSVD (the seeds' QSVD rank allocation): each block's q, k and v
are one unit, the stacked ``[W_q; W_k; W_v]`` whose singular values QSVD keeps; its gradient is
the stacked gradients, a value costs ``d_q + 2 d_kv + E`` parameters, and q, k and v all get the
unit's rank (which ``qsvd`` reads as its joint rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..arch import get_module
from ..errors import RecipeError
from ..registry import ModelStageOutput, register
from .core import stage_linears
from .grads import weight_grads


@dataclass(kw_only=True, frozen=True)
class LowRankAlloc:
    ratio: float = 0.8  # of the targeted linears' parameters, over all of them
    windows: int = 16  # calibration windows for the gradients
    batch_size: int = 2
    score: str = "taylor"  # "taylor": s_i * sum |dL/ds_i|; "grad": sum |dL/ds_i|
    joint: str | None = None  # "qkv": each block's stacked q/k/v is one unit (for qsvd)
    rule: str = "greedy"  # "greedy": values by score per parameter; "proportional": each layer's parameters in proportion to its summed scores

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise RecipeError(f"lowrank_alloc ratio {self.ratio} must be in (0, 1)")
        if self.windows < 1 or self.batch_size < 1:
            raise RecipeError("lowrank_alloc windows and batch_size must be at least 1")
        if self.score not in ("taylor", "grad"):
            raise RecipeError(f"lowrank_alloc score {self.score!r}: expected taylor or grad")
        if self.rule not in ("greedy", "proportional"):
            raise RecipeError(f"lowrank_alloc rule {self.rule!r}: expected greedy or proportional")
        if self.joint not in (None, "qkv"):
            raise RecipeError(f"lowrank_alloc joint {self.joint!r}: expected qkv (or none)")


def singular_value_grads(
    model: nn.Module, units: dict[str, list[str]], data: torch.Tensor, cfg: LowRankAlloc
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(singular values, sum over batches of |dL/ds_i|) of each unit's weight: a unit is one
    linear, or several stacked along their outputs (QSVD's q/k/v), whose gradient is theirs stacked.
    Memory: each unit's singular vectors in float32 (the SVD itself in float64, one unit at a
    time), about 1.3 weight-sized copies for the whole pass; each gradient is projected as the
    backward pass delivers it (a unit's members wait for each other) and dropped."""
    svals, vecs = {}, {}
    for u, names in units.items():
        U, S, Vh = torch.linalg.svd(torch.cat([get_module(model, n).weight.detach() for n in names]).double(), full_matrices=False)
        svals[u], vecs[u] = S, (U.float(), Vh.float())
        del U, Vh
    acc = {u: torch.zeros(svals[u].shape[0], dtype=torch.float64) for u in units}
    unit_of = {n: u for u, names in units.items() for n in names}
    waiting: dict[str, dict[str, torch.Tensor]] = {}

    def consume(name: str, g: torch.Tensor) -> None:
        u = unit_of[name]
        got = waiting.setdefault(u, {})
        got[name] = g.detach()
        if len(got) < len(units[u]):
            return
        G = torch.cat([got[n].float() for n in units[u]])
        del waiting[u]
        U, Vh = vecs[u]
        acc[u] += ((U.T @ G) * Vh).sum(1).abs().double()  # u_i^T G v_i for every i

    weight_grads(model, [n for ns in units.values() for n in ns], data, cfg.windows, cfg.batch_size, consume)
    return {u: (svals[u], acc[u]) for u in units}


def qkv_units(shapes: dict[str, tuple[int, int]], spec) -> dict[str, list[str]]:
    """Each block's [q, k, v] projections as one unit (named by the block), refusing a target list
    that holds part of a block's three or anything else."""
    units: dict[str, list[str]] = {}
    for n in shapes:
        block, _, local = n[len(spec.blocks) + 1 :].partition(".")
        if local not in (spec.q, spec.k, spec.v):
            raise RecipeError(f"lowrank_alloc joint: qkv allocates q/k/v projections only, but {n} is targeted")
        units.setdefault(f"{spec.blocks}.{block}", []).append(n)
    for u, names in units.items():
        if len(names) != 3:
            raise RecipeError(f"lowrank_alloc joint: qkv needs q, k and v of {u} together; it targets {names}")
        names.sort(key=lambda n, u=u: (spec.q, spec.k, spec.v).index(n[len(u) + 1 :]))
    return units


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


def allocate_proportional(scores: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """Ranks per layer: rank 1 each, then the rest of the budget ``ratio * sum(mn)`` shared with
    each layer's parameters in proportion to its importance (the sum of its scores), a layer
    capped below its break-even rank with its excess shared among the others; rounded down, so
    within the budget."""
    cost = {k: m + n for k, (m, n) in shapes.items()}
    room = {k: max(0, -(-m * n // (m + n)) - 2) for k, (m, n) in shapes.items()}  # ranks above 1 below break-even
    imp = {k: max(float(sc.sum()), 0.0) for k, sc in scores.items()}
    left = ratio * sum(m * n for m, n in shapes.values()) - sum(cost.values())
    extra: dict[str, float] = {}
    free = set(shapes)
    while free and left > 0:  # water-filling: what capped layers leave goes to the others
        total = sum(imp[k] for k in free)
        share = {k: left * (imp[k] / total if total > 0 else 1 / len(free)) / cost[k] for k in free}
        over = {k for k in free if share[k] >= room[k]}
        if not over:
            extra.update(share)
            break
        for k in over:
            extra[k] = room[k]
            left -= room[k] * cost[k]
        free -= over
    return {k: 1 + min(room[k], int(extra.get(k, 0))) for k in shapes}


@register(
    "lowrank_alloc",
    LowRankAlloc,
    scope="model",
    summary="rank allocation across layers by singular-value importance (gradients), for the low-rank stages after it",
)
def lowrank_alloc(model: nn.Module, spec, data, stage) -> ModelStageOutput:
    cfg: LowRankAlloc = stage.config
    shapes = stage_linears(model, spec, stage, data, "lowrank_alloc")
    units = qkv_units(shapes, spec) if cfg.joint == "qkv" else {n: [n] for n in shapes}
    unit_shapes = {u: (sum(shapes[n][0] for n in names), shapes[names[0]][1]) for u, names in units.items()}
    found = singular_value_grads(model, units, data, cfg)
    # importance of each singular value, sorted as the factor stages keep them (largest s first)
    scores = {u: (s * g if cfg.score == "taylor" else g) for u, (s, g) in found.items()}
    unit_ranks = (allocate if cfg.rule == "greedy" else allocate_proportional)(scores, unit_shapes, cfg.ratio)
    ranks = {n: unit_ranks[u] for u, names in units.items() for n in names}
    spent = sum(r * sum(unit_shapes[u]) for u, r in unit_ranks.items())
    total = sum(m * n for m, n in shapes.values())
    return ModelStageOutput(
        per_linear={n: {"rank": r} for n, r in ranks.items()},
        summary={
            "ratio": cfg.ratio,
            "spent_ratio": round(spent / total, 6),
            "ranks": ranks,
            "rule": cfg.rule,
            **({"joint": cfg.joint} if cfg.joint else {}),
        },
    )
