"""SmoothQuant (Xiao et al., 2023) and the Outlier Suppression+ shift, as a block-scope method.

Activation outliers live in a few input channels, persistently across tokens. Dividing
channel j of the activations by ``s_j`` and multiplying column j of the weights by it
migrates the quantization difficulty from activations to weights:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(max |W_j| over every linear fed by the same op). The division is folded offline into the
op that produces X (RMSNorm weight, v_proj rows, up_proj rows; see
:mod:`llmpress.transform.scaling`), so the float model is unchanged. ``alpha`` is fixed, or
chosen per block on a grid by the error of the block's output when its linears compute
with fake-quantized weights and activations (``weights`` / ``activations``: the
quantization that the following stage applies) against the float output.

With ``shift`` (Outlier Suppression+, Wei et al., 2023) each channel is first centred by
``z_j = (max_j + min_j) / 2`` (the midpoint of its calibration range), folded into the
linears' biases (created when missing) and, after a norm, a :class:`NormShift` wrapper;
the scales are then computed on the centred ranges ``(max_j - min_j) / 2``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch

from ..arch import get_module
from ..errors import RecipeError
from ..quant.args import QuantArgs
from ..quant.core import fake_quantize
from ..registry import register
from .scaling import (
    ScaleGroup,
    apply_smoothing,
    batches_for,
    group_weight_absmax,
    head_geometry,
    heads_to_kv,
    scale_groups,
    smooth_scales,
)

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class SmoothQuant:
    """SmoothQuant stage. ``search``: choose alpha per block among ``grid`` values in
    [alpha_min, alpha_max] (and no smoothing when ``include_identity``), scoring
    ``search_windows`` calibration windows; otherwise use ``alpha``. ``per_group``: one
    alpha per group of the block instead (greedy in data-flow order, later groups
    unsmoothed while an earlier one is searched; 4x the scoring passes). ``attn_out`` /
    ``mlp_out`` also smooth o_proj (from v_proj) and down_proj (from up_proj)."""

    alpha: float = 0.5
    search: bool = True
    grid: int = 11
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    include_identity: bool = True
    search_windows: int = 8
    per_group: bool = False
    weights: QuantArgs | None = field(default_factory=lambda: QuantArgs(bits=8, granularity="channel"))
    activations: QuantArgs | None = field(default_factory=lambda: QuantArgs(bits=8, granularity="token"))
    attn_out: bool = True
    mlp_out: bool = True
    shift: bool = False
    eps: float = 1e-5

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"alpha={self.alpha!r}: expected a value in [0, 1]")
        if not 0.0 <= self.alpha_min <= self.alpha_max <= 1.0:
            raise RecipeError(f"alpha_min={self.alpha_min!r}, alpha_max={self.alpha_max!r}: need 0 <= alpha_min <= alpha_max <= 1")
        if self.grid < 1:
            raise RecipeError(f"grid={self.grid!r}: expected at least 1 point")
        if self.search_windows < 1:
            raise RecipeError(f"search_windows={self.search_windows!r}: expected at least 1")

    def alphas(self) -> list[float | None]:
        if not self.search:
            return [self.alpha]
        if self.grid == 1:
            pts = [self.alpha_min]
        else:
            pts = [round(self.alpha_min + (self.alpha_max - self.alpha_min) * i / (self.grid - 1), 6) for i in range(self.grid)]
        return ([None] if self.include_identity else []) + pts


@dataclass(kw_only=True)
class GroupStats:
    """What the scale formula needs for one group, in the group's channel space."""

    act_absmax: torch.Tensor
    weight_absmax: torch.Tensor
    shift: torch.Tensor | None = None


def group_stats(block, spec, g: ScaleGroup, stats: dict, shift: bool) -> GroupStats:
    """Activation range (after the optional centring) and weight range of a group."""
    geo = head_geometry(block, spec) if g.kind == "v" else None
    red = (lambda t, r: heads_to_kv(t, geo, r)) if geo else (lambda t, r: t)
    st = stats[g.linears[0]]
    z = None
    if shift and g.kind != "up":
        lo, hi = red(st["channel_minmax"]["min"], "min"), red(st["channel_minmax"]["max"], "max")
        z = (hi + lo) / 2
        act = (hi - lo) / 2
    else:
        act = red(st["channel_stats"]["absmax"], "max")
    return GroupStats(act_absmax=act.float(), weight_absmax=group_weight_absmax(block, spec, g), shift=z)


def _quantize_block_(block, locals_: list[str], wargs: QuantArgs | None, aargs: QuantArgs | None) -> list:
    """Fake-quantize the weights of ``locals_`` in place and hook activation fake-quant."""
    handles = []
    for loc in locals_:
        lin = get_module(block, loc)
        if wargs is not None:
            lin.weight.data = fake_quantize(lin.weight.data, wargs, name=loc)
        if aargs is not None:
            handles.append(lin.register_forward_pre_hook(lambda _m, a, _q=aargs: (fake_quantize(a[0], _q),) + tuple(a[1:])))
    return handles


def score_candidate(ctx, groups, gstats, alphas: list, cfg, ref: list[torch.Tensor], n_batches: int) -> float:
    """Mean squared error of the block output: smoothed (one alpha per group, None = no
    scaling) + quantized copy vs float."""
    blk = copy.deepcopy(ctx.block)
    for g, gs, alpha in zip(groups, gstats, alphas):
        s = smooth_scales(gs.act_absmax, gs.weight_absmax, alpha, cfg.eps) if alpha is not None else None
        if s is not None or gs.shift is not None:
            apply_smoothing(blk, ctx.spec, g, s, gs.shift)
    _quantize_block_(blk, list(ctx.targets), cfg.weights, cfg.activations)
    per_batch: list[tuple[float, int]] = []  # squared error, elements
    ctx.run(block=blk, batches=n_batches, each=lambda b, y: per_batch.append(((y.float() - ref[b].float()).pow(2).sum().item(), y.numel())))
    return sum(e for e, _ in per_batch) / max(sum(n for _, n in per_batch), 1)


@register(
    "smoothquant",
    SmoothQuant,
    scope="block",
    summary="SmoothQuant: migrate activation outliers into the weights (per-channel scales folded offline), optional OS+ shift",
)
def smoothquant(ctx, cfg: SmoothQuant) -> None:
    groups = [g for g in scale_groups(ctx.spec, cfg.attn_out, cfg.mlp_out) if all(p in ctx.targets for p in g.linears)]
    if not groups:
        return
    needs = {g.linears[0]: {"channel_stats"} | ({"channel_minmax"} if cfg.shift else set()) for g in groups}
    stats = ctx.collect(needs)
    gstats = [group_stats(ctx.block, ctx.spec, g, stats, cfg.shift) for g in groups]
    alphas = cfg.alphas()
    chosen = [alphas[0]] * len(groups)
    note: dict = {"shift": cfg.shift}
    if len(alphas) > 1:
        n = batches_for(ctx, cfg.search_windows)
        ref = ctx.outputs(batches=n)
        if cfg.per_group:
            chosen = [None] * len(groups)
            for gi in range(len(groups)):
                errors = {a: score_candidate(ctx, groups, gstats, chosen[:gi] + [a] + chosen[gi + 1 :], cfg, ref, n) for a in alphas}
                chosen[gi] = min(errors, key=errors.get)
        else:
            errors = {a: score_candidate(ctx, groups, gstats, [a] * len(groups), cfg, ref, n) for a in alphas}
            chosen = [min(errors, key=errors.get)] * len(groups)
        note["search_mse"] = errors[chosen[-1]]
        if None in errors and not cfg.per_group:
            note["identity_mse"] = errors[None]
        log.debug("block %d: smoothquant alphas %s", ctx.index, chosen)
    for g, gs, a in zip(groups, gstats, chosen):
        s = smooth_scales(gs.act_absmax, gs.weight_absmax, a, cfg.eps) if a is not None else None
        if s is not None or gs.shift is not None:
            apply_smoothing(ctx.block, ctx.spec, g, s, gs.shift)
    alpha_of = {p: a for g, a in zip(groups, chosen) for p in g.linears}
    for loc in ctx.targets:
        rec = ctx.record(loc)
        rec.methods.append("smoothquant")
        rec.notes["smoothquant"] = {"alpha": alpha_of.get(loc), **note}
