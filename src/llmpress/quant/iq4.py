"""GGUF ``IQ4_NL`` and ``IQ4_XS`` grids: a fixed non-uniform table of 16 levels (llama.cpp's
``kvalues_iq4nl``, denser near 0 where trained weights are) scaled per block of 32 weights, so a
weight is ``s * K[u]`` with ``u`` in 0..15:

- ``IQ4_NL``: one float16 scale ``d`` per block of 32 (4.5 bits per weight);
- ``IQ4_XS``: per super-block of 256 one float16 ``d`` and per block a 6-bit signed code ``sc``
  (-32..31), the block's scale ``d * sc`` (4.25 bits per weight); ``d`` is the super-block's
  signed extreme block scale over -32 (the two-level rule of Q3_K's scales).

:func:`iq4_params` follows llama.cpp's quantizer (``quantize_row_iq4_nl_impl``), vectorized
over every block: weights ``x^2``, or, with an ``importance`` (the input columns' ``diag(H)``),
``importance * sqrt(sigma^2 + x^2)`` with ``sigma^2`` twice the super-block's mean square;
per block the scale of the largest value on the table's top level is the first candidate,
then 15 candidates that put the block's signed extreme near level ``k - 127`` (k = -7..7, the
table read the other way round), each refit by weighted least squares with its levels fixed,
the best fit kept; then the codes are rounded again against the stored scale. Ties of the
nearest level go up, as llama.cpp's ``best_index_int8``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

BLOCK, SUPER, SC_TOP = 32, 256, 32
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # GGUF's IQ4_NL table
TRIES = 7
_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a block below it has scale 0


def levels(device=None) -> torch.Tensor:
    return torch.tensor(KVALUES, dtype=torch.float32, device=device)


def nearest_level(t: torch.Tensor) -> torch.Tensor:
    """Index 0..15 of the table level nearest to ``t`` (a tie goes to the upper level)."""
    k = levels(t.device)
    return torch.bucketize(t.float(), (k[1:] + k[:-1]) / 2, right=True)


@dataclass(kw_only=True)
class IQ4Params:
    """A matrix [R, C] on the IQ4 grid: ``codes`` [R, C] (0..15) and ``d`` (float16 values in
    float32): per block [R, C/32] for ``IQ4_NL``; per super-block [R, C/256] with ``sc``
    [R, C/256, 8] (-32..31) for ``IQ4_XS``."""

    codes: torch.Tensor
    d: torch.Tensor
    sc: torch.Tensor | None = None

    @property
    def xs(self) -> bool:
        return self.sc is not None

    def scales(self) -> torch.Tensor:
        """Each block's scale [R, C/32] (``d * sc`` for IQ4_XS, in float32 as llama.cpp's decoder)."""
        if self.sc is None:
            return self.d
        return (self.d.unsqueeze(-1) * self.sc).reshape(self.d.shape[0], -1)

    def dequantize(self) -> torch.Tensor:
        R, C = self.codes.shape
        q = levels(self.codes.device)[self.codes.long()].reshape(R, C // BLOCK, BLOCK)
        return (self.scales().unsqueeze(-1) * q).reshape(R, C)


def _block_scales(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Best weighted least-squares scale [N] of each block x, w [N, 32] over llama.cpp's candidates."""
    k = levels(x.device)
    ax = x.abs()
    idx = ax.argmax(-1, keepdim=True)
    top = x.gather(-1, idx).squeeze(-1)  # the signed extreme
    dead = ax.amax(-1) < _EPS
    top = torch.where(dead, torch.ones_like(top), top)

    def fit(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = k[nearest_level(inv.unsqueeze(-1) * x)]
        sqx, sq2 = (w * q * x).sum(-1), (w * q * q).sum(-1)
        d = torch.where(sq2 > 0, sqx / torch.where(sq2 > 0, sq2, 1.0), 0.0)
        return d, d * sqx  # the scale and its merit sumqx^2 / sumq2

    best_d, best = fit(-KVALUES[0] / top)  # the extreme on the top level (d = -max / K[0])
    for t in range(-TRIES, TRIES + 1):
        d, merit = fit((t + KVALUES[0]) / top)
        better = merit > best
        best_d, best = torch.where(better, d, best_d), torch.where(better, merit, best)
    return torch.where(dead, 0.0, best_d)


def iq4_params(w: torch.Tensor, importance: torch.Tensor | None = None, *, xs: bool) -> IQ4Params:
    """The IQ4_XS (``xs``) or IQ4_NL form of a matrix ``w`` [R, C] (C a multiple of 256 / 32);
    ``importance`` [C] or [R, C] (non-negative) weights each input column's error."""
    name, unit = ("IQ4_XS", SUPER) if xs else ("IQ4_NL", BLOCK)
    if w.dim() != 2 or w.shape[1] % unit:
        raise UserError(f"{name} needs rows of a multiple of {unit} weights, got a matrix of shape {list(w.shape)}")
    R, C = w.shape
    x = w.detach().float().reshape(R, C // unit, unit)
    if importance is None:
        weights = x.pow(2)
    else:
        sigma2 = 2 * x.pow(2).mean(-1, keepdim=True)
        weights = importance.detach().float().expand(R, C).reshape(x.shape) * (sigma2 + x.pow(2)).sqrt()
    blocks = x.reshape(-1, BLOCK)
    s = _block_scales(blocks, weights.reshape(-1, BLOCK)).reshape(R, C // BLOCK)
    if xs:
        runs = s.reshape(R, C // SUPER, SUPER // BLOCK)
        idx = runs.abs().argmax(-1, keepdim=True)
        d = (runs.gather(-1, idx).squeeze(-1) / -SC_TOP).to(torch.float16).float()
        safe = torch.where(d != 0, d, torch.ones_like(d)).unsqueeze(-1)
        sc = torch.where(d.unsqueeze(-1) != 0, torch.round(runs / safe).clamp_(-SC_TOP, SC_TOP - 1), torch.zeros_like(runs))
        p = IQ4Params(codes=torch.zeros(R, C), d=d, sc=sc)
    else:
        p = IQ4Params(codes=torch.zeros(R, C), d=s.to(torch.float16).float())
    stored = p.scales()
    inv = torch.where(stored != 0, 1.0 / torch.where(stored != 0, stored, 1.0), 0.0)
    p.codes = nearest_level(inv.unsqueeze(-1) * x.reshape(R, C // BLOCK, BLOCK)).reshape(R, C).float()
    return p
