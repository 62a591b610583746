"""AWQ (Lin et al., 2024): activation-aware weight quantization, as a block-scope method.

Weights that multiply large activations matter most. Scaling input channel j of a linear
by ``s_j > 1`` before quantization (and dividing the activation by it, folded into the op
that produces the input) shrinks that channel's relative rounding error. Per group of
linears sharing an input (q/k/v after the attention norm; gate/up after the MLP norm;
o after v; down after up):

    s = mean|X|^alpha,  s <- s / sqrt(max(s) * min(s)),  alpha on a grid in [0, 1]
    loss(alpha) = || f(X; Q(W diag(s)) diag(s)^-1) - f(X; W) ||^2

where f is the sub-module that consumes the group's output (the attention block, the MLP,
or the linear itself) run on calibration inputs. The best ``s`` is folded in (see
:mod:`llmpress.transform.scaling`); then each linear's quantization range is clipped: per
quantization group, the max range shrinks on a grid (1, 0.95, ... ``1 - clip_max_shrink``)
to minimize the error of the group's partial output ``X_g w_g`` on a token subsample.
Finally the weights are quantized with round-to-nearest on the same grid
(``quantize: true``) or left in float for a following stage (``[awq(quantize=false), gptq]``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .. import progress
from ..arch import get_module
from ..errors import RecipeError
from ..registry import register
from ..transform.scaling import (
    apply_smoothing,
    batches_for,
    capture_calls,
    first_tensor,
    head_geometry,
    heads_to_kv,
    kv_to_heads,
    run_calls,
    scale_groups,
)
from .args import QuantArgs
from .core import QParams, _codes, _dequant, _int_params, fake_quantize, group_view, quantize_weight

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class AWQ:
    """AWQ stage. ``search_windows`` calibration windows score the scale grid (``grid``
    alphas in [0, 1]) and feed the clip search (``clip_tokens`` tokens per linear).
    ``clip_qk``: also clip q_proj/k_proj (the paper skips them: attention scores are
    sensitive). ``attn_out`` / ``mlp_out``: scale o_proj (from v_proj) / down_proj (from up_proj)."""

    weights: QuantArgs = field(default_factory=lambda: QuantArgs(bits=4, group_size=64))
    quantize: bool = True
    grid: int = 20
    search_windows: int = 8
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    clip_qk: bool = False
    attn_out: bool = True
    mlp_out: bool = True

    def __post_init__(self):
        if self.weights is None or self.weights.kind != "int":
            raise RecipeError("weights: AWQ needs integer weight quantization arguments")
        if self.weights.granularity == "token":
            raise RecipeError("weights.granularity: 'token' is for activations; use tensor, channel or group")
        if self.grid < 1 or self.clip_grid < 1:
            raise RecipeError(f"grid={self.grid!r}, clip_grid={self.clip_grid!r}: expected at least 1 point")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise RecipeError(f"clip_max_shrink={self.clip_max_shrink!r}: expected a value in [0, 1)")
        if self.search_windows < 1 or self.clip_tokens < 1:
            raise RecipeError("search_windows and clip_tokens must be at least 1")


# --------------------------------------------------------------------------- pure functions
def awq_scales(mean_abs: torch.Tensor, alpha: float, eps: float = 1e-4) -> torch.Tensor:
    """s = mean|X|^alpha, normalized so that max(s) * min(s) = 1."""
    s = mean_abs.double().clamp_min(eps).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s.float()


def scaled_fake_quant(weight: torch.Tensor, s_cols: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1: the weight the scaled, quantized linear computes with."""
    return (fake_quantize(weight * s_cols, args).double() / s_cols.double()).to(weight.dtype)


def _clip_params(lo: torch.Tensor, hi: torch.Tensor, ratio: torch.Tensor | float, args: QuantArgs) -> QParams:
    return _int_params(lo * ratio, hi * ratio, args)


def _clamp_groups(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ratio, args: QuantArgs) -> torch.Tensor:
    """Clamp groups [R, G, g] to ``ratio`` times their range (lo/hi [R, G])."""
    if args.symmetric:
        m = (torch.maximum(lo.abs(), hi.abs()) * ratio).unsqueeze(-1)
        return torch.maximum(torch.minimum(wg, m), -m)
    return torch.maximum(torch.minimum(wg, (hi * ratio).unsqueeze(-1)), (lo * ratio).unsqueeze(-1))


def clip_search(
    weight: torch.Tensor, x: torch.Tensor, args: QuantArgs, grid: int = 20, max_shrink: float = 0.5, row_chunk: int = 256
) -> torch.Tensor:
    """Clip ratio per quantization group [out, G] minimizing the group's output error.

    For group g of row o: err(p) = mean_t (x_tg . w_og - x_tg . Q_p(w_og))^2 where Q_p
    quantizes with the range shrunk to p * [min, max] (symmetric: p * max|w|), p in
    1, 1 - 1/grid, ..., > 1 - max_shrink. ``x`` [T, in] are the linear's inputs.
    """
    if args.granularity == "tensor":
        return torch.ones(1, 1)
    wg_all = group_view(weight.float(), args)  # [out, G, g]
    out, G, g = wg_all.shape
    xg = x.float().reshape(-1, G, g)  # [T, G, g]
    steps = max(1, int(round(grid * max_shrink)))
    best = torch.ones(out, G)
    for r0 in range(0, out, row_chunk):
        wg = wg_all[r0 : r0 + row_chunk]
        lo, hi = wg.amin(-1), wg.amax(-1)
        ref = torch.einsum("ogk,tgk->ogt", wg, xg)
        best_err = torch.full((wg.shape[0], G), float("inf"))
        for i in range(steps):
            p = 1.0 - i / grid
            wc = _clamp_groups(wg, lo, hi, p, args)  # clip, then quantize the clipped group
            qp = _clip_params(lo, hi, p, args)
            qw = _dequant(_codes(wc, qp, args), qp)
            err = (torch.einsum("ogk,tgk->ogt", qw, xg) - ref).pow_(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0 : r0 + row_chunk] = torch.where(better, torch.tensor(p), best[r0 : r0 + row_chunk])
    return best


def apply_clip(weight: torch.Tensor, ratio: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Clamp each quantization group to ``ratio`` times its range (a later min-max quantizer
    then uses exactly the clipped range)."""
    if args.granularity == "tensor":
        return weight
    wg = group_view(weight, args)
    out = _clamp_groups(wg, wg.amin(-1), wg.amax(-1), ratio.to(weight.dtype), args)
    return out.reshape(weight.shape)


# --------------------------------------------------------------------------- handler
def _search_group(ctx, g, calls, cfg: AWQ, bar=None) -> tuple[float, torch.Tensor]:
    """Best alpha and scale vector (group channel space) for one group (``bar``: advanced per alpha)."""
    block, spec = ctx.block, ctx.spec
    geo = head_geometry(block, spec) if g.kind == "v" else None
    mod = get_module(block, g.inspect)
    xs = [first_tensor(c) for c in calls]
    mean_abs = torch.cat([x.reshape(-1, x.shape[-1]).abs().float() for x in xs]).mean(0)
    if geo:
        mean_abs = heads_to_kv(mean_abs, geo, "mean")
    ref = run_calls(mod, calls)
    lins = [get_module(block, p) for p in g.linears]
    orig = [lin.weight.data.clone() for lin in lins]
    best = (float("inf"), 0.0, torch.ones_like(mean_abs))
    alphas = [i / (cfg.grid - 1) for i in range(cfg.grid)] if cfg.grid > 1 else [0.0]
    try:
        for a in alphas:
            s = awq_scales(mean_abs, a)
            s_cols = kv_to_heads(s, geo) if geo else s
            for lin, w in zip(lins, orig):
                lin.weight.data = scaled_fake_quant(w, s_cols.to(w.dtype), cfg.weights)
            out = run_calls(mod, calls)
            err = sum((o.float() - r.float()).pow(2).sum().item() for o, r in zip(out, ref)) / sum(r.numel() for r in ref)
            if err < best[0]:
                best = (err, a, s)
            if bar is not None:
                bar.update(1, f"scales {g.inspect} alpha {a:.2f}")
    finally:
        for lin, w in zip(lins, orig):
            lin.weight.data = w
    return best[1], best[2]


def _subsample(x: torch.Tensor, n: int) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= n:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, n).round().long()
    return x[idx]


@register(
    "awq", AWQ, scope="block", summary="AWQ: activation-aware per-channel scales (grid search) + clipping search, then RTN or a following stage"
)
def awq(ctx, cfg: AWQ) -> None:
    spec = ctx.spec
    groups = [g for g in scale_groups(spec, cfg.attn_out, cfg.mlp_out) if all(p in ctx.targets for p in g.linears)]
    n = batches_for(ctx, cfg.search_windows)
    notes: dict[str, dict] = {loc: {} for loc in ctx.targets}
    clip_locals = []
    if cfg.clip and cfg.weights.granularity != "tensor":
        skip = set() if cfg.clip_qk else {spec.q, spec.k}
        clip_locals = [loc for loc in ctx.targets if loc not in skip]
    # one line under the engine's block bar: the scale grid of each group, then each clip search
    with progress.bar(len(groups) * cfg.grid + len(clip_locals), f"awq block {ctx.index}", "search") as bar:
        if groups:
            calls = capture_calls(ctx, [g.inspect for g in groups], n)
            for g in groups:
                alpha, s = _search_group(ctx, g, calls[g.inspect], cfg, bar)
                apply_smoothing(ctx.block, spec, g, s=s)
                for p in g.linears:
                    notes[p]["alpha"] = alpha
            del calls
        if clip_locals:
            calls = capture_calls(ctx, clip_locals, n)
            for loc in clip_locals:
                lin = get_module(ctx.block, loc)
                x = _subsample(torch.cat([first_tensor(c).reshape(-1, lin.in_features) for c in calls[loc]]), cfg.clip_tokens)
                ratio = clip_search(lin.weight.data, x, cfg.weights, cfg.clip_grid, cfg.clip_max_shrink)
                lin.weight.data = apply_clip(lin.weight.data, ratio, cfg.weights)
                notes[loc]["clip_mean"] = round(float(ratio.mean()), 4)
                bar.update(1, f"clip {loc}")
            del calls
    for loc in ctx.targets:
        rec = ctx.record(loc)
        rec.methods.append("awq")
        rec.notes["awq"] = notes[loc]
        if cfg.quantize:
            lin = get_module(ctx.block, loc)
            w, qp = quantize_weight(lin.weight.data, cfg.weights, rec.name)
            lin.weight.data.copy_(w)
            rec.weight_args = cfg.weights
            rec.qparams = qp
