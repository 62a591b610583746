"""Kept outlier weights (the SpQR / OWQ idea): a low-bit dense part plus a sparse
full-precision part holding the few weights that quantization would hurt most.

Sensitivity of weight (o, j) (``score``):

- ``quant_error``: (w - q(w))^2 * diag(H)_j with diag(H)_j = 2/n ||X_j||^2 (the error the
  weight's rounding adds to the layer output, OBS with a diagonal Hessian);
- ``activation``: |w| * ||X_j||_2 (Wanda's score, from the channel norms);
- ``magnitude``: |w| (no data).

The top ``fraction`` of weights of the layer by sensitivity are kept at 16 bits in a CSR
matrix (values, column indices, row pointers); they are removed from the dense weight
before its quantization grid is computed (so they no longer stretch their groups' range)
and their dense codes are zero. The layer computes ``x (Q + S)^T``.

Storage, counted honestly in the record (``notes["extra_bits"]``, which
:meth:`ModuleRecord.bits_per_weight` adds): 16-bit value + 16-bit column index per kept
weight, plus (out + 1) 32-bit row pointers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..errors import RecipeError, UserError
from ..registry import ModuleContext, register
from .args import QuantArgs
from .core import QParams, fake_quantize, quantize_weight

SCORES = ("quant_error", "activation", "magnitude")
VALUE_BITS = 16
INDEX_BITS = 16
ROWPTR_BITS = 32


def outlier_scores(weight: torch.Tensor, args: QuantArgs, channel_l2: torch.Tensor | None, score: str = "quant_error") -> torch.Tensor:
    """Sensitivity of every weight [out, in] (higher = keep in full precision)."""
    w = weight.float()
    if score == "magnitude":
        return w.abs()
    if channel_l2 is None:
        raise UserError(f"outlier score {score!r} needs the input channel norms (channel_stats)")
    norm = channel_l2.float().to(w.device).unsqueeze(0)
    if score == "activation":
        return w.abs() * norm
    if score == "quant_error":
        return (w - fake_quantize(w, args)).pow(2) * norm.pow(2)
    raise RecipeError(f"outlier score {score!r} unknown; expected one of {', '.join(SCORES)}")


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the round(fraction * numel) highest scores (exactly that many)."""
    k = int(round(fraction * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k).indices] = True
    return mask.reshape(scores.shape)


def csr_extra_bits(nnz: int, out_features: int) -> int:
    """Bits of a CSR matrix with ``nnz`` 16-bit values: values + column indices + row pointers."""
    return nnz * (VALUE_BITS + INDEX_BITS) + (out_features + 1) * ROWPTR_BITS


def split_outliers(weight: torch.Tensor, args: QuantArgs, keep: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, QParams, torch.Tensor]:
    """(dense dequantized weight with zeros at ``keep``, its qparams, sparse CSR fp16 outliers).

    The effective weight is ``dense + sparse.to_dense()``.
    """
    w = weight.float()
    dense_src = w.masked_fill(keep, 0.0)
    dense, qp = quantize_weight(dense_src, args, name)
    dense = dense.masked_fill(keep, 0.0)  # symmetric/asymmetric grids both hold 0 exactly
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        sparse = (w.half() * keep).to_sparse_csr()
    return dense, qp, sparse


@dataclass(kw_only=True, frozen=True)
class Outliers:
    """Quantize with ``weights`` and keep the top ``fraction`` of weights (by ``score``)
    in 16-bit as a sparse matrix."""

    weights: QuantArgs = field(default_factory=lambda: QuantArgs(bits=3, group_size=64))
    fraction: float = 0.005
    score: str = "quant_error"

    def __post_init__(self):
        if self.weights is None:
            raise RecipeError("weights: the outliers method needs weight quantization arguments")
        if not 0.0 <= self.fraction < 1.0:
            raise RecipeError(f"fraction={self.fraction!r}: expected a value in [0, 1)")
        if self.score not in SCORES:
            raise RecipeError(f"score={self.score!r}: expected one of {', '.join(SCORES)}")


@register("outliers", Outliers, needs=("channel_stats",), summary="low-bit RTN weights + the most sensitive weights kept in fp16 (sparse CSR)")
def outliers(ctx: ModuleContext, cfg: Outliers) -> None:
    l2 = ctx.stats.get("channel_stats", {}).get("l2")
    scores = outlier_scores(ctx.weight, cfg.weights, l2, cfg.score)
    keep = top_fraction_mask(scores, cfg.fraction)
    dense, qp, sparse = split_outliers(ctx.weight, cfg.weights, keep, ctx.name)
    ctx.set_weight(dense + sparse.to_dense().float())
    nnz = int(keep.sum())
    ctx.record.weight_args = cfg.weights
    ctx.record.qparams = qp
    ctx.record.notes["outliers"] = {"nnz": nnz, "fraction": nnz / keep.numel(), "score": cfg.score}
    ctx.record.notes["extra_bits"] = csr_extra_bits(nnz, ctx.weight.shape[0])
