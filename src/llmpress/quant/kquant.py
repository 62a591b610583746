"""GGUF ``Q4_K``'s, ``Q5_K``'s and ``Q2_K``'s grids: asymmetric 4-bit (5-bit) groups of 32
whose scale and minimum are both two-level (per super-block of 256 weights one float16 ``d``
and ``dmin``, per group 6-bit unsigned codes ``sc`` and ``m``), so a weight is
``d * sc * u - dmin * m`` with ``u`` in 0..15 (0..31). Q4_K and Q5_K differ only in the
codes' width and the first search's candidates; ``Q2_K`` has 2-bit codes in groups of 16 with
4-bit ``sc`` / ``m`` (second level over 15), weights ``|x|`` and candidates compared by
absolute error in its plain search, ``sigma^2`` the super-block's mean square (not twice it)
under an importance, as llama.cpp's.

:func:`q4_k_params` / :func:`q5_k_params` follow llama.cpp's reference quantizers
(``quantize_row_q4_K_ref`` / ``_q5_K_ref``), vectorized over every group of a matrix:

1. per group, the (scale, minimum) search of ``make_qkx2_quants``: from the group's range
   ``[min(x, 0), max(x)]``, candidate step counts ``nmax + rmin + rdelta * i`` (i = 0..nstep;
   ``nmax`` 15 or 31, ``(rmin, rdelta, nstep)`` (-1, 0.1, 20) for Q4_K, (-0.5, 0.1, 15) for Q5_K)
   each round the group, then refit scale and minimum by weighted least squares with the
   codes fixed (a minimum above 0 is clamped to 0 and the scale refitted alone); the
   candidate of least weighted squared error is kept, the min-max rounding being the first;
   weights ``sqrt(mean x^2) + |x|`` (the reference's), or, given an ``importance`` (e.g. the
   input columns' ``diag(H)``), ``importance * sqrt(sigma^2 + x^2)`` with ``sigma^2`` twice the
   super-block's mean square and the finer search (``-0.9``, ``0.05``, 36 steps) that
   llama.cpp uses with an importance matrix;
2. per super-block ``d = fp16(max scale / 63)``, ``dmin = fp16(max minimum / 63)``, the group
   codes rounded to nearest (at most 63) (with an importance: see below);
3. every weight re-rounded on its group's stored ``d * sc`` and ``dmin * m``; a group whose
   stored scale is 0 keeps the search's codes.

With an importance the second level is llama.cpp's ``make_qp_quants`` instead (a search
of the step count, then coordinate descent on the 6-bit codes weighted by each group's
weight sum). Sums run in a different order than llama.cpp's
sequential loops, so a near-tie between two candidates can resolve differently (the test
against llama.cpp's own quantizer states how often).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

QK_K, GROUP, SMAX = 256, 32, 63
PLAIN_SEARCH = {2: (-0.5, 0.1, 15), 4: (-1.0, 0.1, 20), 5: (-0.5, 0.1, 15)}  # (rmin, rdelta, nstep) of the reference quantizers
WEIGHTED_SEARCH = (-0.9, 0.05, 36)  # with an importance matrix, every type


def group_of(bits: int) -> int:
    """Weights per group: 16 for Q2_K, 32 for Q4_K / Q5_K."""
    return 16 if bits == 2 else GROUP


def smax_of(bits: int) -> int:
    """The largest second-level code: 15 (4-bit ``sc`` / ``m``) for Q2_K, 63 (6-bit) for Q4_K / Q5_K."""
    return 15 if bits == 2 else SMAX


def nmax(bits: int) -> int:
    """The largest code of a ``bits``-wide K-quant (15 for Q4_K, 31 for Q5_K)."""
    return (1 << bits) - 1


@dataclass(kw_only=True)
class KParams:
    """A matrix [R, C] on the Q4_K (``bits`` 4) or Q5_K (``bits`` 5) grid: ``d``, ``dmin``
    [R, C/256] (float16 values in float32), ``sc``, ``m`` [R, C/256, 8] (integers 0..63) and
    ``codes`` [R, C] (0..15 / 0..31)."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    codes: torch.Tensor
    bits: int = 4

    @property
    def group(self) -> int:
        return group_of(self.bits)

    def scale_min(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's stored scale ``d * sc`` and minimum ``dmin * m``, [R, C/256, 256/group]."""
        return self.d.unsqueeze(-1) * self.sc, self.dmin.unsqueeze(-1) * self.m

    def dequantize(self) -> torch.Tensor:
        """``d * sc * u - dmin * m`` in float32, in llama.cpp's order of operations."""
        s, mn = self.scale_min()
        R, n, _ = s.shape
        u = self.codes.reshape(R, n, QK_K // self.group, self.group)
        return (s.unsqueeze(-1) * u - mn.unsqueeze(-1)).reshape(self.codes.shape)


def _search(
    x: torch.Tensor, w: torch.Tensor, rmin: float, rdelta: float, nstep: int, top: int, mad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` over groups x, w [N, g] with codes 0..``top``: (scale [N],
    minimum >= 0 [N], codes [N, g]); candidates compared by weighted squared error, or by
    weighted absolute error with ``mad`` (Q2_K's reference).

    As in llama.cpp, a candidate that wins moves the offset the later candidates round from
    (their range is ``max - best minimum so far``)."""
    hi = x.amax(-1)
    low = x.amin(-1).clamp(max=0.0)
    flat = hi == low
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)

    def round_on(steps: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        iscale = steps / torch.where(flat, 1.0, hi - low)
        return torch.round(iscale.unsqueeze(-1) * (x - low.unsqueeze(-1))).clamp_(0, top)

    def error(scale: torch.Tensor, low: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        diff = scale.unsqueeze(-1) * q + low.unsqueeze(-1) - x
        return (w * (diff.abs() if mad else diff.pow(2))).sum(-1)

    best_q = round_on(torch.tensor(float(top)), low)
    best_scale = 1 / (top / torch.where(flat, 1.0, hi - low))  # as llama.cpp: 1 / iscale
    best_err = error(best_scale, low, best_q)
    f32 = torch.float32
    for i in range(nstep + 1):  # the step count in float32, as llama.cpp computes it
        q = round_on(torch.tensor(rmin, dtype=f32) + torch.tensor(rdelta, dtype=f32) * i + top, low)
        sum_l, sum_l2, sum_xl = (w * q).sum(-1), (w * q * q).sum(-1), (w * q * x).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, 1.0)
        scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_low = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_low > 0
        scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), scale)
        this_low = torch.where(pos, 0.0, this_low)
        err = error(scale, this_low, q)
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale, low = torch.where(better, scale, best_scale), torch.where(better, this_low, low)
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
    best_scale = torch.where(flat, 0.0, best_scale)
    best_q = torch.where(flat.unsqueeze(-1), 0.0, best_q)
    return best_scale, -low, best_q


def _two_level_nearest(v: torch.Tensor, smax: int = SMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per super-block values [.., k] >= 0 -> (fp16-valued ``d`` = max / smax [..], codes
    0..smax [.., k] rounded to nearest): the reference quantizer's second level."""
    top = v.amax(-1).clamp(min=0.0)
    inv = torch.where(top > 0, smax / torch.where(top > 0, top, 1.0), 0.0)
    codes = torch.round(inv.unsqueeze(-1) * v).clamp_(0, smax)
    return (top / smax).to(torch.float16).float(), codes


def _two_level_weighted(v: torch.Tensor, sw: torch.Tensor, smax: int = SMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """The second level with an importance (llama.cpp's ``make_qp_quants``): per super-block
    [.., k] values ``v`` >= 0 and group weights ``sw``, the step count ``smax + 0.1 k`` (k = -4..4)
    of least weighted error, then up to 5 passes of coordinate descent on the codes that
    raise the least-squares fit ``(sum w v l)^2 / sum w l^2``, and ``d`` that fit's
    ``sum w v l / sum w l^2`` (float16)."""
    f32 = torch.float32
    top = v.amax(-1).clamp(min=0.0)
    dead = top < 1e-15
    topn = torch.where(dead, 1.0, top).unsqueeze(-1)

    def codes_on(iscale: torch.Tensor) -> torch.Tensor:
        return torch.round(iscale * v).clamp_(max=smax)

    iscale = smax / topn
    best = (sw * (v - codes_on(iscale) / iscale).pow(2)).sum(-1)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        cand = (torch.tensor(0.1, dtype=f32) * k + smax) / topn
        err = (sw * (v - codes_on(cand) / cand).pow(2)).sum(-1)
        better = (err < best).unsqueeze(-1)
        best = torch.where(better.squeeze(-1), err, best)
        iscale = torch.where(better, cand, iscale)
    L = codes_on(iscale)
    sumlx, suml2 = (sw * v * L).sum(-1), (sw * L * L).sum(-1)
    for _ in range(5):
        changed = torch.zeros_like(dead)
        for i in range(v.shape[-1]):
            w, x, li = sw[..., i], v[..., i], L[..., i]
            slx, sl2 = sumlx - w * x * li, suml2 - w * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.round(x * sl2 / torch.where(ok, slx, 1.0)).clamp_(max=smax)
            slx, sl2 = slx + w * x * new, sl2 + w * new * new
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[..., i] = torch.where(take, new, li)
            sumlx, suml2 = torch.where(take, slx, sumlx), torch.where(take, sl2, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    d = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    return torch.where(dead, 0.0, d).to(torch.float16).float(), torch.where(dead.unsqueeze(-1), 0.0, L)


def q4_k_params(w: torch.Tensor, importance: torch.Tensor | None = None) -> KParams:
    """The Q4_K form of a matrix ``w`` [R, C] (C a multiple of 256); ``importance`` [C] or
    [R, C] (non-negative) weights each input column's error."""
    return k_params(w, importance, bits=4)


def q5_k_params(w: torch.Tensor, importance: torch.Tensor | None = None) -> KParams:
    """The Q5_K form of ``w``, as :func:`q4_k_params`."""
    return k_params(w, importance, bits=5)


def k_params(w: torch.Tensor, importance: torch.Tensor | None = None, *, bits: int) -> KParams:
    """The Q2_K (``bits`` 2), Q4_K (4) or Q5_K (5) form of a matrix ``w`` [R, C] (C a multiple
    of 256). Q2_K differs beyond its width as llama.cpp's does: groups of 16, 4-bit ``sc`` /
    ``m``, the plain search weighted by ``|x|`` and compared by absolute error, ``sigma^2`` the
    super-block's mean square (not twice it) under an importance."""
    if bits not in PLAIN_SEARCH:
        raise UserError(f"K-quant grids are 2, 4 or 5 bits here (Q2_K, Q4_K, Q5_K), not {bits}")
    name = f"Q{bits}_K"
    if w.dim() != 2 or w.shape[1] % QK_K:
        raise UserError(f"{name} needs rows of a multiple of {QK_K} weights, got a matrix of shape {list(w.shape)}")
    R, C = w.shape
    n, g, smax = C // QK_K, group_of(bits), smax_of(bits)
    top = nmax(bits)
    x = w.detach().float().reshape(R, n, QK_K // g, g)
    mad = False
    if importance is None and bits == 2:
        weights, search, mad = x.abs(), PLAIN_SEARCH[bits], True
    elif importance is None:
        av = x.pow(2).mean(-1, keepdim=True).sqrt()
        weights, search = av + x.abs(), PLAIN_SEARCH[bits]
    else:
        imp = importance.detach().float().expand(R, C).reshape(R, n, QK_K // g, g)
        sigma2 = (1 if bits == 2 else 2) * x.pow(2).mean((-2, -1), keepdim=True)
        weights, search = imp * (sigma2 + x.pow(2)).sqrt(), WEIGHTED_SEARCH
    scale, low, q = _search(x.reshape(-1, g), weights.reshape(-1, g), *search, top, mad=mad)
    scale, low = scale.reshape(R, n, -1), low.reshape(R, n, -1)
    if importance is None:
        (d, sc), (dmin, m) = _two_level_nearest(scale, smax), _two_level_nearest(low, smax)
    else:
        sw = weights.sum(-1)
        (d, sc), (dmin, m) = _two_level_weighted(scale, sw, smax), _two_level_weighted(low, sw, smax)
    out = KParams(d=d, dmin=dmin, sc=sc, m=m, codes=q.reshape(R, C), bits=bits)
    s, mn = out.scale_min()  # every weight re-rounded on the stored values (the search's codes where s = 0)
    u = torch.round((x + mn.unsqueeze(-1)) / torch.where(s > 0, s, 1.0).unsqueeze(-1)).clamp_(0, top)
    out.codes = torch.where((s > 0).unsqueeze(-1), u, q.reshape(x.shape)).reshape(R, C)
    return out
