"""OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): non-uniform sparsity
across decoder blocks, lower where outliers are dense.

For block l, the outlier ratio D_l is the share of its weights whose Wanda score
A_ij = |W_ij| * ||X_j||_2 exceeds ``m`` times the block's mean score (all targeted
linears of the block pooled; norms from the dense model on calibration windows). With
r_l = 2 * lam * (D_l - min D) / (max D - min D), block l keeps a density of
(1 - s) + r_l - mean(r): the mean over blocks stays at the target s, the spread is 2 lam,
and blocks with more outliers are pruned less.

The ``owl`` stage (model scope, before the engine) returns each targeted linear's offset
(s_l - s) as a per-linear setting (``ModelStageOutput.per_linear[name]["sparsity_offset"]``);
the unstructured pruning stages that follow (``sparsegpt``, ``wanda``, ``magnitude``) read it
from ``ctx.settings`` and add it to their own ``sparsity``. N:M patterns ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..arch import get_module
from ..errors import RecipeError
from ..registry import ModelStageOutput, register
from .masks import effective_sparsity  # noqa: F401  (importable from here as before)


def _block_of(name: str, spec) -> int:
    return int(name[len(spec.blocks) + 1 :].split(".")[0])


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of the pooled entries above ``m`` times their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_offsets(ratios: list[float], lam: float) -> list[float]:
    """Sparsity offsets per block (mean 0, spread 2 lam, negative where ratios are high)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    span = float(d.max() - d.min())
    r = torch.zeros_like(d) if span == 0 else (d - d.min()) / span * 2 * lam
    return [float(x) for x in -(r - r.mean())]


@dataclass(kw_only=True, frozen=True)
class OWL:
    """OWL stage: ``lam`` (half the spread of block sparsities), ``m`` (outlier threshold
    in multiples of the mean score), ``windows`` (calibration windows for the norms)."""

    lam: float = 0.08
    m: float = 5.0
    windows: int = 32
    batch_size: int = 4

    def __post_init__(self):
        if not 0.0 <= self.lam < 0.5:
            raise RecipeError(f"lam={self.lam!r}: expected a value in [0, 0.5)")
        if self.m <= 0:
            raise RecipeError(f"m={self.m!r}: expected a positive multiple of the mean score")
        if self.windows < 1 or self.batch_size < 1:
            raise RecipeError("windows and batch_size must be at least 1")


@torch.no_grad()
def block_outlier_ratios(model: nn.Module, spec, data: torch.Tensor, names: list[str], cfg: OWL) -> dict[int, float]:
    """D_l per decoder block index, from one dense forward pass over ``cfg.windows`` windows."""
    sumsq: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:

        def hook(_mod, inp, _out, _n=n):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            acc = sumsq.get(_n)
            sq = (x * x).sum(0)
            sumsq[_n] = sq if acc is None else acc + sq

        handles.append(get_module(model, n).register_forward_hook(hook))
    dev = next(model.parameters()).device
    try:
        for i in range(0, min(cfg.windows, data.shape[0]), cfg.batch_size):
            model(input_ids=data[i : min(i + cfg.batch_size, cfg.windows)].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    per_block: dict[int, list[torch.Tensor]] = {}
    for n in names:
        block = _block_of(n, spec)
        w = get_module(model, n).weight.detach().abs().float()
        per_block.setdefault(block, []).append(w * sumsq[n].sqrt().to(w.device).unsqueeze(0))
    return {block: outlier_ratio(s, cfg.m) for block, s in sorted(per_block.items())}


@register("owl", OWL, scope="model", summary="OWL: per-block sparsity offsets from the outlier ratio of |W|*||x|| (for the pruning stages after it)")
def owl(model: nn.Module, spec, data, stage) -> ModelStageOutput:
    cfg: OWL = stage.config
    if data is None:
        raise RecipeError("owl needs calibration data")
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n.startswith(spec.blocks + ".") and stage.matches(n, True)]
    if not names:
        raise RecipeError(f"owl: no linear matches targets {list(stage.targets)}")
    ratios = block_outlier_ratios(model, spec, data, names, cfg)
    offsets = dict(zip(ratios, owl_offsets(list(ratios.values()), cfg.lam)))
    return ModelStageOutput(
        per_linear={n: {"sparsity_offset": offsets[_block_of(n, spec)]} for n in names},
        summary={"outlier_ratio": ratios, "sparsity_offset": offsets},
    )
