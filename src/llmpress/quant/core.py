"""Quantize / dequantize: the seeds' formulas as pure tensor functions.

Integer quantization:  q = round(clamp(x / S, qmin, qmax)) (+ z when asymmetric),
x_hat = (q - z) * S.  Symmetric: S = max|x| / qmax, z = 0, q in [-2^(b-1), 2^(b-1)-1]
(``full_range``: S = max|x| / (qmax + 1/2), every code used; ``signed_scale``:
S = x_m / qmin with x_m the signed value of largest |x|, negative where x_m > 0, so x_m is
exactly the code qmin = -2^(b-1): llama.cpp's Q4_0 rule).
Asymmetric: S = (max - min) / (2^b - 1), z = round(-min / S), q in [0, 2^b - 1].
Ternary: alpha = mean |x| over the entries with |x| > s, Q(x) = alpha * sign(x) where
|x| > s else 0. Binary: alpha = mean |x|, Q(x) = alpha * sign(x).

Statistics are taken per group: a weight [out, in] is viewed as [R, G, g]
(tensor: [1, 1, out*in]; channel: [out, 1, in]; group: [out, in/g, g]); an activation
[..., d] per token is viewed as [tokens, 1, d].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import UserError
from .args import QuantArgs

_EPS = 1e-12


@dataclass(kw_only=True)
class QParams:
    scale: torch.Tensor  # [R, G]
    zero_point: torch.Tensor | None = None  # [R, G], integer-valued float, asymmetric only
    threshold: torch.Tensor | None = None  # [R, G], ternary only


def group_view(x: torch.Tensor, args: QuantArgs, name: str | None = None) -> torch.Tensor:
    """View ``x`` as [R, G, g] for its granularity (a view, no copy when contiguous)."""
    if args.granularity == "tensor":
        return x.reshape(1, 1, -1)
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if args.granularity in ("channel", "token"):
        return rows.reshape(rows.shape[0], 1, d)
    g = args.group_size
    if d % g:
        divisors = [k for k in (32, 64, 96, 128, 192, 256) if d % k == 0]
        where = f"layer {name}: " if name else ""
        raise UserError(
            f"{where}group_size {g} does not divide the input dimension {d}"
            + (f" (divisors that work: {', '.join(map(str, divisors))})" if divisors else "")
        )
    if args.super_block and d % args.super_block:
        where = f"layer {name}: " if name else ""
        raise UserError(f"{where}super_block {args.super_block} does not divide the input dimension {d}")
    return rows.reshape(rows.shape[0], d // g, g)


def floor_magnitude(scale: torch.Tensor, floor: float) -> torch.Tensor:
    """``scale`` with every magnitude below ``floor`` raised to it, the sign kept (0: +floor);
    ``clamp_min(floor)`` for non-negative scales."""
    return torch.where(scale.abs() < floor, torch.where(scale < 0, -floor, floor), scale)


def symmetric_scale(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """The symmetric scale of groups with minimum ``lo`` and maximum ``hi`` (differentiable
    in both: blockwise learning uses it): ``max|x| / qmax``, ``/ (qmax + 1/2)`` with
    ``full_range``, ``x_m / qmin`` with ``signed_scale`` (x_m: lo or hi, whichever is larger
    in magnitude; a tie takes lo, a positive scale); magnitudes floored at 1e-12."""
    if args.signed_scale:
        return floor_magnitude(torch.where(hi.abs() > lo.abs(), hi, lo) / args.qmin, _EPS)
    amax = torch.maximum(lo.abs(), hi.abs())
    return (amax / (args.qmax + 0.5 if args.full_range else args.qmax)).clamp_min(_EPS)


def _int_params(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> QParams:
    if args.symmetric:
        return QParams(scale=_stored_scale(symmetric_scale(lo, hi, args), args))
    lo = lo.clamp_max(0)
    hi = hi.clamp_min(0)
    scale = _stored_scale(((hi - lo) / (args.qmax - args.qmin)).clamp_min(_EPS), args)
    zero = torch.round(-lo / scale).clamp(args.qmin, args.qmax)
    return QParams(scale=scale, zero_point=zero)


# the smallest positive float16 (a subnormal): a scale rounded to float16 never becomes 0
_FP16_TINY = 2.0**-24


def _stored_scale(scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``scale`` as the format stores it (``args.scale_dtype``): float16 values, held in
    float32. Asymmetric grids of up to 5 bits keep ``bits`` fewer significant bits (7 of
    float16's 11 at 4 bits), so that a zero point (< 2^bits) times the scale is a float16
    value too (GGUF ``Q4_1`` / ``Q5_1`` store ``-zero * scale`` as their fp16 minimum).
    ``super_block``: then the two-level form (:func:`_two_level`)."""
    if args.scale_dtype != "float16":
        return scale
    if not args.symmetric and args.bits <= 5:
        m, e = torch.frexp(scale)  # scale = m * 2^e, m in [0.5, 1)
        keep = 2.0 ** (11 - args.bits)
        scale = torch.ldexp(torch.round(m * keep) / keep, e)
    scale = floor_magnitude(scale.to(torch.float16).float(), _FP16_TINY)
    return _two_level(scale, args.super_block // args.group_size, args.group_scale_bits) if args.super_block else scale


def _two_level(scale: torch.Tensor, k: int, code_bits: int = 8) -> torch.Tensor:
    """Group scales [R, G] as ``d * sc``: per run of ``k`` groups one float16 ``d`` (the run's
    signed extreme / -2^(b-1), b = ``code_bits``) and b-bit signed codes ``sc`` (the extreme's
    exactly -2^(b-1), none 0)."""
    R, G = scale.shape
    top = float(2 ** (code_bits - 1))
    runs = scale.reshape(R, G // k, k)
    idx = runs.abs().argmax(-1, keepdim=True)
    d = floor_magnitude((runs.gather(-1, idx) / -top).to(torch.float16).float(), _FP16_TINY)
    sc = torch.round(runs / d).clamp_(-top, top - 1).scatter_(-1, idx, -top)
    sc = torch.where(sc == 0, 1.0, sc)
    return (d * sc).reshape(R, G)


def _sign_params(xg: torch.Tensor, args: QuantArgs) -> QParams:
    a = xg.abs()
    if args.kind == "binary":
        return QParams(scale=a.mean(-1).clamp_min(_EPS))
    s = args.ternary_threshold * a.mean(-1, keepdim=True)
    keep = a > s
    alpha = (a * keep).sum(-1) / keep.sum(-1).clamp_min(1)
    return QParams(scale=alpha.clamp_min(_EPS), threshold=s.squeeze(-1))


def _codes(xg: torch.Tensor, qp: QParams, args: QuantArgs) -> torch.Tensor:
    if args.kind == "binary":
        return torch.where(xg >= 0, 1.0, -1.0).to(xg.dtype)
    if args.kind == "ternary":
        if qp.threshold is None:  # values already on the grid {-alpha, 0, alpha}
            return torch.round(xg / qp.scale.unsqueeze(-1)).clamp(-1, 1)
        return torch.sign(xg) * (xg.abs() > qp.threshold.unsqueeze(-1))
    q = torch.clamp(torch.round(xg / qp.scale.unsqueeze(-1)) + (0 if qp.zero_point is None else qp.zero_point.unsqueeze(-1)), args.qmin, args.qmax)
    return q


def _dequant(qg: torch.Tensor, qp: QParams) -> torch.Tensor:
    if qp.zero_point is not None:
        qg = qg - qp.zero_point.unsqueeze(-1)
    return qg * qp.scale.unsqueeze(-1)


def compute_qparams(x: torch.Tensor, args: QuantArgs, name: str | None = None, importance: torch.Tensor | None = None) -> QParams:
    """Scale (and zero point / threshold) of each group of ``x``.

    ``importance`` (optional, broadcastable to the group view [R, G, g], e.g. diag(H) per
    input column) weights the error minimized by the ``mse`` and ``lsq`` observers.
    """
    xg = group_view(x, args, name).float()
    if args.kind != "int":
        return _sign_params(xg, args)
    lo, hi = xg.amin(-1), xg.amax(-1)
    if args.clip_ratio != 1.0:
        lo, hi = lo * args.clip_ratio, hi * args.clip_ratio
    best = _int_params(lo, hi, args)
    if args.observer == "minmax":
        return best
    if args.observer == "lsq":
        return _lsq_search(xg, lo, hi, args, importance)
    return _mse_search(xg, lo, hi, args, importance)


def _mse_search(xg, lo, hi, args: QuantArgs, importance) -> QParams:
    """Per group, the clipping ratio p in [1 - maxshrink, 1] minimizing sum |x - Q_p(x)|^norm.

    Coarse-to-fine: ``sqrt(mse_grid)``-ish coarse points over the whole interval, then a
    fine pass around each group's best coarse point at the full ``mse_grid`` resolution
    (about 3x fewer evaluations than a flat grid, same optimum to within one fine step).
    """
    step = args.mse_maxshrink / args.mse_grid
    n_coarse = max(2, int(round(args.mse_grid**0.5 * 2)))
    coarse = max(1, args.mse_grid // n_coarse)  # fine steps per coarse step
    best_err = torch.full_like(lo, float("inf"))
    best_p = torch.ones_like(lo)

    def try_p(p: torch.Tensor) -> None:
        nonlocal best_err, best_p
        cand = _int_params(p * lo, p * hi, args)
        err = (_dequant(_codes(xg, cand, args), cand) - xg).abs_().pow_(args.mse_norm)
        if importance is not None:
            err = err * importance
        err = err.sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, p, best_p)

    for i in range(0, args.mse_grid, coarse):
        try_p(torch.full_like(lo, 1.0 - step * i))
    center = best_p.clone()
    for j in range(-coarse + 1, coarse):
        if j:
            try_p((center - step * j).clamp(1.0 - args.mse_maxshrink, 1.0))
    return _int_params(best_p * lo, best_p * hi, args)


def _lsq_search(xg, lo, hi, args: QuantArgs, importance) -> QParams:
    """Per group, llama.cpp's imatrix scale search (``make_qx_quants``), on llmpress's grid.

    For each candidate ``k`` in ``-lsq_steps..lsq_steps`` the range is put on
    ``N + k lsq_step`` grid steps instead of the rule's ``N`` (``args.lsq_span``: 8 for
    ``signed_scale`` 4 bits, llama.cpp's ``-(8 + 0.1 k) / x_m``), the group rounded on that
    scale (codes ``q``, zero point ``z`` as the rule gives it), and the scale refitted by
    weighted least squares with the codes fixed, ``S = sum w x (q-z) / sum w (q-z)^2``
    (``w``: ``importance``, 1 without; ``lsq_magnitude``: times ``sqrt(sigma^2 + x^2)``,
    ``sigma^2`` the mean square of the row of the group view). The refitted scale is
    rounded as stored (``scale_dtype``), the group re-rounded to its nearest codes on it (as ``quantize``
    does), and the candidate of least ``sum w (x - x_hat)^2`` kept; the rule's own params
    (``minmax``) are a candidate too, so the error is never above min-max's. ``super_block``:
    the search runs on float16 group scales, then the chosen ones take the two-level form.
    Vectorized over groups: one pass per candidate.
    """
    free = dataclasses.replace(args, super_block=None, group_scale_bits=8) if args.super_block else args
    w = torch.ones((), dtype=xg.dtype, device=xg.device) if importance is None else importance.to(xg.dtype)
    if args.lsq_magnitude:  # llama.cpp's Q4_0 / Q5_0: qw * sqrt(sigma2 + x^2), sigma2 the row's mean square
        w = w * (xg.pow(2).mean((-2, -1), keepdim=True) + xg.pow(2)).sqrt()

    def error(qp: QParams) -> torch.Tensor:
        return ((_dequant(_codes(xg, qp, free), qp) - xg).pow_(2) * w).sum(-1)

    best = _int_params(lo, hi, free)
    best_err = error(best)
    n = args.lsq_span
    for k in range(-args.lsq_steps, args.lsq_steps + 1):
        r = n / (n + k * args.lsq_step)
        cand = _int_params(r * lo, r * hi, free)
        q = _codes(xg, cand, free)
        if cand.zero_point is not None:
            q = q - cand.zero_point.unsqueeze(-1)
        num, den = (w * xg * q).sum(-1), (w * q * q).sum(-1)
        fit = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), cand.scale)
        fit = _stored_scale(floor_magnitude(fit, _EPS), free)
        cand = QParams(scale=fit, zero_point=cand.zero_point)
        err = error(cand)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(
            scale=torch.where(better, fit, best.scale),
            zero_point=None if best.zero_point is None else torch.where(better, cand.zero_point, best.zero_point),
        )
    if args.super_block:
        best.scale = _two_level(best.scale, args.super_block // args.group_size, args.group_scale_bits)
    return best


def quantize(x: torch.Tensor, qp: QParams, args: QuantArgs) -> torch.Tensor:
    """Integer codes of ``x`` (same shape as ``x``, float dtype holding integers)."""
    xg = group_view(x, args).float()
    return _codes(xg, qp, args).reshape(x.shape)


def dequantize(codes: torch.Tensor, qp: QParams, args: QuantArgs, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qg = group_view(codes, args).float()
    return _dequant(qg, qp).reshape(codes.shape).to(dtype)


def fake_quantize(x: torch.Tensor, args: QuantArgs, qp: QParams | None = None, name: str | None = None) -> torch.Tensor:
    """Quantize then dequantize (the value the quantized model computes with)."""
    if qp is None:
        qp = compute_qparams(x, args, name)
    xg = group_view(x, args, name).float()
    return _dequant(_codes(xg, qp, args), qp).reshape(x.shape).to(x.dtype)


def quantize_weight(
    w: torch.Tensor, args: QuantArgs, name: str | None = None, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, QParams]:
    """Round-to-nearest on a weight: (dequantized weight, qparams)."""
    qp = compute_qparams(w, args, name, importance)
    return fake_quantize(w, args, qp, name), qp


def bits_per_weight(args: QuantArgs, in_features: int, out_features: int) -> float:
    """Storage bits per weight including scales (``scale_bits``) and zero points (``bits``)."""
    n = in_features * out_features
    if args.granularity == "tensor":
        groups = 1
    elif args.granularity in ("channel", "token"):
        groups = out_features
    else:
        groups = out_features * (in_features // args.group_size)
    overhead = groups * (args.scale_bits + (args.bits if args.has_zero_point else 0))
    if args.super_block:  # group_scale_bits-wide group scale codes, one scale_bits super-scale per super-block
        overhead = groups * args.group_scale_bits + n // args.super_block * args.scale_bits
    return args.bits + overhead / n
