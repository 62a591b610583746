"""Rank allocation by a measured sensitivity sweep (ASVD's approach), to compare with
``lowrank_alloc``'s gradient scores.

On the uncompressed model and ``windows`` calibration windows: for every targeted linear and
every ratio of ``ratios``, the linear alone is replaced by its truncated SVD at that ratio and the
calibration loss measured (the others untouched); ``sensitivity[layer][ratio]`` is the loss
increase. Then, as ASVD does, one threshold on the increase is searched (bisection) so that each
layer taking the smallest ratio whose increase stays under it spends at most the budget,
``ratio`` times the targeted linears' parameters; a layer no ratio keeps under the threshold
takes the largest. The ranks travel to the factor stage after it as per-linear settings (``rank``),
like ``lowrank_alloc``'s.

Cost: one loss evaluation per (layer, ratio) pair: 210 linears x 4 ratios = 840 forward passes of
``windows`` windows on SmolLM2-135M, each starting at the truncated layer's block (the blocks
before it replay their recorded outputs), so on average about half the blocks run. The
truncations are plain SVD (no data), the factor stage afterwards may be any low-rank method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import progress
from ..arch import blocks, get_module
from ..errors import RecipeError
from ..registry import ModelStageOutput, register
from .core import rank_for_ratio, stage_linears


@dataclass(kw_only=True, frozen=True)
class LowRankSweep:
    ratio: float = 0.8  # of the targeted linears' parameters, over all of them
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)  # candidate per-layer ratios (each must save parameters)
    windows: int = 4
    batch_size: int = 4

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise RecipeError(f"lowrank_sweep ratio {self.ratio} must be in (0, 1)")
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise RecipeError(f"lowrank_sweep ratios {list(self.ratios)} must lie in (0, 1)")
        if self.windows < 1 or self.batch_size < 1:
            raise RecipeError("lowrank_sweep windows and batch_size must be at least 1")


@torch.no_grad()
def _loss(model: nn.Module, data: torch.Tensor, cfg: LowRankSweep, at_batch=None) -> float:
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for b, i in enumerate(range(0, min(cfg.windows, data.shape[0]), cfg.batch_size)):
        if at_batch is not None:
            at_batch(b)
        ids = data[i : min(i + cfg.batch_size, cfg.windows)].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


class _Replay:
    """Skips the decoder blocks before the perturbed one: the unperturbed pass records every
    block's output per batch; while a linear of block ``l`` is truncated, blocks ``0..l-1`` return
    their recorded outputs without computing (their inputs are unchanged, so the outputs are the
    same tensors), and only blocks ``l..L-1`` and the head run. Holds ``windows x seqlen x hidden``
    numbers per block."""

    def __init__(self, model: nn.Module):
        self.blocks = list(blocks(model))
        self.outs: list[list] = [[] for _ in self.blocks]
        self.batch = 0

    def record(self, model: nn.Module, data: torch.Tensor, cfg: LowRankSweep) -> float:
        hooks = [blk.register_forward_hook(lambda mod, args, out, j=j: self.outs[j].append(out)) for j, blk in enumerate(self.blocks)]
        try:
            return _loss(model, data, cfg)
        finally:
            for h in hooks:
                h.remove()

    def block_of(self, model: nn.Module, names: list[str]) -> dict[str, int]:
        where = {id(m): j for j, blk in enumerate(self.blocks) for m in blk.modules()}
        return {n: where.get(id(get_module(model, n)), 0) for n in names}

    def loss(self, model: nn.Module, data: torch.Tensor, cfg: LowRankSweep, first: int) -> float:
        for j in range(first):
            self.blocks[j].forward = lambda *a, j=j, **k: self.outs[j][self.batch]
        try:
            return _loss(model, data, cfg, at_batch=lambda b: setattr(self, "batch", b))
        finally:
            for j in range(first):
                del self.blocks[j].forward


def sensitivities(model: nn.Module, names: list[str], data: torch.Tensor, cfg: LowRankSweep, replay: bool = True) -> dict[str, dict[float, float]]:
    """Loss increase of each layer truncated alone at each ratio (``replay``: the blocks before
    the layer's own are not recomputed, see ``_Replay``; False recomputes the whole model)."""
    rp = _Replay(model)
    base = rp.record(model, data, cfg) if replay else _loss(model, data, cfg)
    first = rp.block_of(model, names) if replay else dict.fromkeys(names, 0)
    out: dict[str, dict[float, float]] = {}
    with progress.bar(len(names) * len(cfg.ratios), "lowrank_sweep", "eval") as bar:
        for n in names:
            lin = get_module(model, n)
            w0 = lin.weight.data.clone()
            m, k = w0.shape
            out[n] = {}
            U, S, Vh = torch.linalg.svd(w0.double(), full_matrices=False)
            for ratio in cfg.ratios:
                r = rank_for_ratio(m, k, ratio, n)
                lin.weight.data.copy_(((U[:, :r] * S[:r]) @ Vh[:r]).to(w0.dtype))  # the rank-r truncation (one SVD per layer)
                out[n][ratio] = rp.loss(model, data, cfg, first[n]) - base
                bar.update(1, f"{n} {ratio}")
            lin.weight.data.copy_(w0)
    return out


def choose(sens: dict[str, dict[float, float]], shapes: dict[str, tuple[int, int]], budget_ratio: float) -> dict[str, float]:
    """Per-layer ratios: the smallest whose loss increase is under a threshold, the threshold the
    smallest (bisection over the measured increases) that keeps the parameters within the budget."""
    budget = budget_ratio * sum(m * n for m, n in shapes.values())

    def pick(tau: float) -> dict[str, float]:
        res = {}
        for n, s in sens.items():
            ok = [r for r in sorted(s) if s[r] <= tau]
            res[n] = ok[0] if ok else max(s)
        return res

    def cost(p: dict[str, float]) -> float:
        return sum(rank_for_ratio(*shapes[n], r) * sum(shapes[n]) for n, r in p.items())

    taus = sorted({v for s in sens.values() for v in s.values()})
    lo, hi = 0, len(taus) - 1
    best = pick(taus[-1])  # the loosest threshold: every layer at its smallest ratio
    while lo <= hi:  # larger threshold -> smaller ratios -> fewer parameters
        mid = (lo + hi) // 2
        p = pick(taus[mid])
        if cost(p) <= budget:
            best, hi = p, mid - 1
        else:
            lo = mid + 1
    return best


@register(
    "lowrank_sweep", LowRankSweep, scope="model", summary="rank allocation by a per-layer sensitivity sweep (ASVD), for the low-rank stages after it"
)
def lowrank_sweep(model: nn.Module, spec, data, stage) -> ModelStageOutput:
    cfg: LowRankSweep = stage.config
    shapes = stage_linears(model, spec, stage, data, "lowrank_sweep")
    names = list(shapes)
    for n in names:
        for r in cfg.ratios:
            rank_for_ratio(*shapes[n], r, n)  # every candidate must be a valid factorization, before any evaluation
    sens = sensitivities(model, names, data, cfg)
    ratios = choose(sens, shapes, cfg.ratio)
    ranks = {n: rank_for_ratio(*shapes[n], r) for n, r in ratios.items()}
    total = sum(m * n for m, n in shapes.values())
    spent = sum(r * sum(shapes[n]) for n, r in ranks.items())
    return ModelStageOutput(
        per_linear={n: {"rank": r} for n, r in ranks.items()},
        summary={"ratio": cfg.ratio, "spent_ratio": round(spent / total, 6), "ranks": ranks, "layer_ratios": ratios},
    )
