"""Learned rounding (AdaRound, Nagel et al., 2020) and learned group scales (AdaQuant,
Hubara et al., 2021) on one weight, from the layer Hessian alone.

The layer-wise problem ``min ||W X - W_hat X||^2`` equals, with ``H = 2/n X X^T``,
``n/2 tr((W - W_hat) H (W - W_hat)^T)``: no stored activations, only the Hessian the
engine already accumulates for GPTQ.

Grid: the stage's QuantArgs give the scale ``s`` (and zero point ``z``) of each group
(min-max, or the MSE-clipped search weighted by ``diag(H)``). Each weight is written
``w / s = floor(w / s) + r`` with ``r`` in [0, 1); AdaRound replaces the rounding choice
(down or up) by a continuous variable ``h(V)`` in [0, 1], the rectified sigmoid

    h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1,

initialised so that ``h(V) = r`` (the soft weight starts at the weight itself), and
minimizes

    tr(dW H dW^T) / E_rtn  +  lam * mean(1 - |2 h(V) - 1|^beta),
    dW = W - s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z)

with Adam, ``beta`` annealed from ``beta_start`` (20: the regularizer only touches values
already near 0 or 1) to ``beta_end`` (2: it pushes every value to 0 or 1) after a warm-up
without the regularizer. ``E_rtn`` (the nearest-rounding error) makes the first term 1 at
the start, so ``lam`` does not depend on the layer's scale. At the end the codes are hard:
``floor(W / s) + [h(V) >= 1/2] + z``, clamped to the grid, so the result is an ordinary
integer grid (packing verifies it bit for bit). If the hard codes do worse than nearest
rounding (possible on a hard layer), nearest rounding is kept and the result says so.

``learn_scale`` (AdaQuant): every group scale is learned too, as ``s = s0 * m`` with ``m``
projected onto ``[scale_min, 1]`` after every step: the grid only narrows, never widens
beyond its starting grid (itself min-max or narrower). Nothing here draws random numbers:
the result is a deterministic function of the inputs (on the same torch build and threads).

``damp``: ``damp * mean(diag H)`` is added to H's diagonal before anything else (the
starting grid's search, ``E_rtn``, the loss), as GPTQ damps its Hessian: the loss gains a
plain weight-error term ``damp * mean(diag H) * ||dW||^2``, which keeps the rounding from
leaning on the calibration text's input correlations, which other text does not share
(issue 22: undamped, ``adaround-w4g64`` lost to nearest rounding on code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .args import QuantArgs, check_group_divides
from .core import QParams, compute_qparams, group_view
from .hessian import layer_error, prepare

ZETA = 1.1
GAMMA = -0.1


@dataclass(kw_only=True, frozen=True)
class AdaRoundOptions:
    """What the optimization does (see the module docstring). ``warmup``: share of the
    iterations without the rounding regularizer."""

    iters: int = 100
    lr: float = 0.1
    lam: float = 20.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    learn_scale: bool = False
    scale_lr: float = 1e-2
    scale_min: float = 0.5
    damp: float = 0.0

    def __post_init__(self):
        check_options(self)


def check_options(o, error: type[UserError] = UserError) -> None:
    """Refuse options the optimization cannot run with (``error`` naming the field);
    shared by the options above and the method's config (which raises RecipeError)."""

    def number(key):
        v = getattr(o, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise error(f"{key}={v!r}: expected a number")
        return v

    if isinstance(o.iters, bool) or not isinstance(o.iters, int) or o.iters < 1:
        raise error(f"iters={o.iters!r}: expected an integer of at least 1")
    for key in ("lr", "scale_lr", "beta_start", "beta_end"):
        if number(key) <= 0:
            raise error(f"{key}={getattr(o, key)!r}: expected a positive number")
    if number("lam") < 0:
        raise error(f"lam={o.lam!r}: expected a number >= 0")
    if not 0.0 <= number("warmup") < 1.0:
        raise error(f"warmup={o.warmup!r}: expected a fraction in [0, 1)")
    if not 0.0 < number("scale_min") <= 1.0:
        raise error(f"scale_min={o.scale_min!r}: expected a fraction in (0, 1]")
    if number("damp") < 0:
        raise error(f"damp={o.damp!r}: expected a number >= 0 (a fraction of the Hessian's mean diagonal)")


@dataclass(kw_only=True)
class AdaRoundResult:
    weight: torch.Tensor  # [R, C] float32, dequantized, on the grid of qparams
    qparams: QParams
    error_rtn: float  # tr(dW H dW^T) of nearest rounding on the starting grid
    error: float  # the same for the result
    undecided: float  # share of h(V) not yet at 0 or 1 (|h - round(h)| > 0.01) before hardening
    flipped: float  # share of codes that differ from nearest rounding
    kept_rtn: bool = False  # the learned codes did worse: nearest rounding kept


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) = h for h in (0, 1) (h is kept off the clamp's flat parts)."""
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def rounding_penalty(h: torch.Tensor, beta: float) -> torch.Tensor:
    """mean(1 - |2h - 1|^beta): 0 when every h is 0 or 1, 1 at h = 1/2."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).mean()


def beta_at(step: int, o: AdaRoundOptions) -> float | None:
    """The regularizer's exponent at ``step``: None during the warm-up, then linear from
    ``beta_start`` to ``beta_end``."""
    start = int(o.warmup * o.iters)
    if step < start:
        return None
    t = (step - start) / max(1, o.iters - 1 - start)
    return o.beta_start + (o.beta_end - o.beta_start) * t


@dataclass(kw_only=True)
class _Grid:
    base: torch.Tensor  # [R, G, g] floor(W / s0)
    rest: torch.Tensor  # [R, G, g] W / s0 - base, in [0, 1)
    scale: torch.Tensor  # [R, G, 1] s0
    zero: torch.Tensor  # [R, G, 1] or a 0-d zero
    qmin: int
    qmax: int

    def weight(self, h: torch.Tensor, m: torch.Tensor | None, shape) -> torch.Tensor:
        s = self.scale if m is None else self.scale * m
        q = torch.clamp(self.base + h + self.zero, self.qmin, self.qmax)
        return ((q - self.zero) * s).reshape(shape)


def _start_grid(W: torch.Tensor, H: torch.Tensor, args: QuantArgs, name) -> tuple[_Grid, QParams]:
    R, C = W.shape
    importance = group_view(torch.diagonal(H).expand(R, C), args, name) if args.takes_importance else None
    qp = compute_qparams(W, args, name, importance)
    wg = group_view(W, args, name)
    s = qp.scale.unsqueeze(-1)
    zero = qp.zero_point.unsqueeze(-1) if qp.zero_point is not None else torch.zeros((), dtype=W.dtype)
    base = torch.floor(wg / s)
    return _Grid(base=base, rest=wg / s - base, scale=s, zero=zero, qmin=args.qmin, qmax=args.qmax), qp


def _check(weight, args: QuantArgs, name, learn_scale: bool) -> None:
    where = f"layer {name}: " if name else ""
    if args.kind != "int":
        raise UserError(f"{where}adaround learns the rounding of integer grids; kind {args.kind!r} has no rounding to learn")
    if args.granularity == "token":
        raise UserError(f"{where}granularity 'token' is for activations; use tensor, channel or group")
    if weight.dim() == 2:
        check_group_divides(args, weight.shape[1], where)
    if learn_scale and args.scale_dtype != "float32":
        raise UserError(f"{where}learn_scale keeps float32 scales; scale_dtype {args.scale_dtype!r} would move them off the learned values")


class _Quadratic(torch.autograd.Function):
    """tr(D H D^T) for a symmetric H with one product per step: the gradient 2 D H reuses
    the forward's D H (autograd would compute a second [R, C] x [C, C] product)."""

    @staticmethod
    def forward(ctx, D, H):
        P = D @ H
        ctx.save_for_backward(P)
        return (P * D).sum()

    @staticmethod
    def backward(ctx, g):
        (P,) = ctx.saved_tensors
        return 2.0 * g * P, None


def _optimize(grid: _Grid, W: torch.Tensor, H: torch.Tensor, e_rtn: float, o: AdaRoundOptions):
    """Adam on V (and the scale multipliers): returns (h(V) detached, m or None)."""
    V = inverse_rectified_sigmoid(grid.rest).requires_grad_(True)
    m = torch.ones_like(grid.scale, requires_grad=True) if o.learn_scale else None
    groups = [{"params": [V], "lr": o.lr}] + ([{"params": [m], "lr": o.scale_lr}] if m is not None else [])
    opt = torch.optim.Adam(groups)
    norm = 1.0 / max(e_rtn, 1e-30)
    for step in range(o.iters):
        opt.zero_grad(set_to_none=True)
        h = rectified_sigmoid(V)
        D = W - grid.weight(h, m, W.shape)
        loss = _Quadratic.apply(D, H) * norm
        beta = beta_at(step, o)
        if beta is not None and o.lam > 0:
            loss = loss + o.lam * rounding_penalty(h, beta)
        loss.backward()
        opt.step()
        if m is not None:
            with torch.no_grad():
                m.clamp_(o.scale_min, 1.0)
    return rectified_sigmoid(V).detach(), (None if m is None else m.detach())


def adaround_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    *,
    options: AdaRoundOptions | None = None,
    name: str | None = None,
    hessian_owned: bool = False,
) -> AdaRoundResult:
    """Learned rounding of ``weight`` [out, in] on the grid of ``args``, minimizing
    ``tr((W - W_hat) H (W - W_hat)^T)`` with the layer Hessian ``hessian`` [in, in]
    (``hessian_owned``: the caller gives it up, so it is used in place, not copied)."""
    o = options or AdaRoundOptions()
    _check(weight, args, name, o.learn_scale)
    W, H, _dead = prepare(weight, hessian, name, owned=hessian_owned)
    if o.damp:
        H.diagonal().add_(o.damp * float(H.diagonal().mean()))
    grid, qp0 = _start_grid(W, H, args, name)
    with torch.no_grad():
        rtn_up = torch.round(grid.base + grid.rest) - grid.base  # torch's half-to-even, as nearest rounding does
        w_rtn = grid.weight(rtn_up, None, W.shape)
    e_rtn = layer_error(W, w_rtn, H)
    with torch.enable_grad():
        h, m = _optimize(grid, W, H, e_rtn, o)
    undecided = float(((h - h.round()).abs() > 0.01).float().mean())
    up = (h >= 0.5).to(W.dtype)
    scale = grid.scale if m is None else grid.scale * m
    hard = _Grid(base=grid.base, rest=grid.rest, scale=scale, zero=grid.zero, qmin=grid.qmin, qmax=grid.qmax)
    w_hat = hard.weight(up, None, W.shape)
    err = layer_error(W, w_hat, H)
    codes = lambda g, u: torch.clamp(g.base + u + g.zero, g.qmin, g.qmax)  # noqa: E731
    flipped = float((codes(hard, up) != codes(grid, rtn_up)).float().mean())
    qp = QParams(scale=scale.squeeze(-1).clone(), zero_point=qp0.zero_point)
    if err > e_rtn:
        return AdaRoundResult(weight=w_rtn, qparams=qp0, error_rtn=e_rtn, error=e_rtn, undecided=undecided, flipped=0.0, kept_rtn=True)
    return AdaRoundResult(weight=w_hat, qparams=qp, error_rtn=e_rtn, error=err, undecided=undecided, flipped=flipped)
