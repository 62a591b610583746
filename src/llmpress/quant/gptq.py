"""GPTQ (Frantar et al., 2022): quantize a weight column by column with error feedback.

For column i (in processing order), every row is quantized, ``q = quant(w_i)``, and the
error is spread onto the columns not yet quantized with the OBS update
``W[:, i:] -= (w_i - q) / U_ii * U[i, i:]`` where U is the upper Cholesky factor of the
damped inverse Hessian (see :mod:`llmpress.quant.hessian`). Columns are processed in
blocks of ``block_size``: inside a block the updates are rank-one and touch only the
block; the rest of the matrix receives the block's accumulated errors in one GEMM
(lazy batch update).

Quantization grid: :func:`llmpress.quant.core.compute_qparams` with the stage's
QuantArgs (min-max or MSE observer; the MSE observer's clipping search weights each
column's error by ``diag(H)``, which lowers GPTQ's layer error against the unweighted
search and avoids its worst cases: clipping a weight that multiplies a massive
activation). Per-tensor and per-channel scales are computed from the original weight
before the loop. Group scales are computed

- with ``static_groups`` (the default): for all groups from the original weight before
  the loop. Required with activation order (columns taken by descending ``diag(H)``):
  the groups stay the contiguous column ranges of the original layout, so packing needs
  no permutation index. With the min-max observer it is also as good or better: the
  error feedback makes later columns grow, and min-max scales fitted to the grown
  columns are coarser (see the synthetic problems of tests/quant/test_gptq.py). With the
  MSE observer, fitting the groups as they are reached can do better;
- without: when the loop reaches the group's first column, from the group's current
  (error-updated) weights, as in the GPTQ paper's reference code.

The result holds the dequantized weight and QParams such that
``quantize(W_hat, qparams, args)`` returns the exact integer codes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..errors import RecipeError
from ..registry import ModuleContext, register
from .args import QuantArgs
from .gptq_solve import GPTQResult, gptq_quantize  # noqa: F401  (importable from here as before)
from .sweep import (  # noqa: F401  (ColumnQuantizer, current_rows, record_solver_notes: importable from here as before)
    ColumnQuantizer,
    SweepBlock,
    activation_order,
    column_sweep,
    current_rows,
    importance,
    record_solver_notes,
    solver_threads,
    validate_regularizers,
    validate_solver_fields,
)

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class GPTQ:
    """GPTQ stage config. ``damp``: fraction of mean(diag H) added to the diagonal
    (raised automatically when the Cholesky factorization fails). ``act_order`` (default
    on): columns by descending diag(H), which does better than the natural order, most of
    all off the calibration text (docs/second-order.md). ``static_groups``:
    group scales from the original weight before the loop (required with ``act_order``)
    rather than from the updated weights as each group is reached."""

    weights: QuantArgs = field(default_factory=QuantArgs)
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    activations: QuantArgs | None = None
    shrink: float = 0.0  # H <- (1 - shrink) H + shrink diag(H): less trust in the calibration text's correlations
    diag_floor: float = 0.0  # H_jj >= diag_floor * mean(diag H): inputs rare in the calibration text cost as if common

    def __post_init__(self):
        validate_solver_fields(self.block_size, self.damp)
        validate_regularizers(self.shrink, self.diag_floor)
        if self.weights is None:
            raise RecipeError("weights: GPTQ needs weight quantization arguments")
        if self.weights.granularity == "token":
            raise RecipeError("weights.granularity: 'token' is for activations; use tensor, channel or group")
        if self.weights.super_block and not self.static_groups:
            raise RecipeError(
                "static_groups: two-level scales (weights.super_block) need static_groups: true (a super-block's scales are fitted together)"
            )
        if self.act_order and self.weights.granularity == "group" and not self.static_groups:
            raise RecipeError(
                "static_groups: act_order with group quantization needs static_groups: true "
                "(groups formed in activation order would need a column permutation index, which packing does not store)"
            )


@register("gptq", GPTQ, needs=("hessian",), summary="GPTQ: second-order weight quantization with error feedback (OBS family)")
def gptq(ctx: ModuleContext, cfg: GPTQ) -> None:
    hessian, owned = ctx.take("hessian")
    res = gptq_quantize(
        ctx.weight,
        hessian,
        cfg.weights,
        block_size=cfg.block_size,
        damp=cfg.damp,
        act_order=cfg.act_order,
        static_groups=cfg.static_groups,
        shrink=cfg.shrink,
        diag_floor=cfg.diag_floor,
        name=ctx.name,
        hessian_owned=owned,
    )
    ctx.set_weight(res.weight)
    rec = ctx.record
    rec.weight_args = cfg.weights
    rec.qparams = res.qparams
    record_solver_notes(rec, res, "gptq_loss")
    if cfg.activations is not None:
        rec.act_args = cfg.activations
