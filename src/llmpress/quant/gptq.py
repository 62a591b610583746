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

import torch

from ..errors import RecipeError, UserError
from ..registry import ModuleContext, register
from .args import QuantArgs, check_group_divides
from .core import QParams, compute_qparams
from .hessian import inverse_cholesky, prepare
from .sweep import (  # noqa: F401  (ColumnQuantizer, current_rows, record_solver_notes: importable from here as before)
    ColumnQuantizer,
    SweepBlock,
    activation_order,
    column_sweep,
    current_rows,
    importance,
    record_solver_notes,
    solver_threads,
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
        for key in ("shrink", "diag_floor"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise RecipeError(f"{key}={v!r}: expected a fraction in [0, 1]")
        if self.weights is None:
            raise RecipeError("weights: GPTQ needs weight quantization arguments")
        if self.weights.granularity == "token":
            raise RecipeError("weights.granularity: 'token' is for activations; use tensor, channel or group")
        if self.act_order and self.weights.granularity == "group" and not self.static_groups:
            raise RecipeError(
                "static_groups: act_order with group quantization needs static_groups: true "
                "(groups formed in activation order would need a column permutation index, which packing does not store)"
            )


@dataclass(kw_only=True)
class GPTQResult:
    weight: torch.Tensor  # [R, C] float32, dequantized
    qparams: QParams
    damp: float  # dampening used (fraction of mean diag H)
    damp_retries: int
    loss: float  # sum over weights of (w - q)^2 / (2 [H^-1]_qq): the OBS estimate of the error
    dead: int = 0  # number of dead input columns
    perm: torch.Tensor | None = None  # processing order (act_order), original column indices
    fallback: bool = False  # damping never worked: diagonal Hessian, no error feedback


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
    mse_importance: bool = True,
    shrink: float = 0.0,
    diag_floor: float = 0.0,
    name: str | None = None,
    hessian_owned: bool = False,
) -> GPTQResult:
    """GPTQ on one weight [out, in] with the layer Hessian [in, in] (2/n X^T X).

    ``mse_importance``: with the MSE observer, weight each column's clipping error by
    ``H_jj`` (its input's mean square), so clipping spares the columns that feed large
    activations. ``shrink``: solve with ``(1 - shrink) H + shrink diag(H)`` (1: no error
    feedback between columns, i.e. round-to-nearest). ``diag_floor``: raise every ``H_jj``
    below ``diag_floor * mean(diag H)`` to it, so the error feedback cannot load inputs that
    are rare in the calibration text (an MLP neuron that fires on code, say) with large
    changes that are cheap there and costly where they fire. ``hessian_owned``: the caller
    gives ``hessian`` up (it may be overwritten; no copy is made).
    """
    validate_solver_fields(block_size, damp)
    if args.granularity == "token":
        raise UserError("GPTQ quantizes weights: granularity 'token' is for activations")
    C = weight.shape[-1]
    check_group_divides(args, C, f"layer {name}: " if name else "")
    static = bool(static_groups)
    if act_order and args.granularity == "group" and not static:
        raise UserError("GPTQ: act_order with group quantization needs static groups")
    with solver_threads(weight.device):
        W, H, dead = prepare(weight, hessian, name, owned=hessian_owned)
        del hessian
        if shrink:  # off-diagonal entries scaled by 1 - shrink, the diagonal kept
            d = torch.diagonal(H).clone()
            H.mul_(1.0 - shrink)
            torch.diagonal(H).copy_(d)
        if diag_floor:
            dg = torch.diagonal(H)
            dg.clamp_(min=diag_floor * float(dg.mean()))
        return _gptq(W, H, dead, args, block_size, damp, act_order, static, mse_importance, name)


def _gptq(W, H, dead, args, block_size, damp, act_order, static, mse_importance, name) -> GPTQResult:
    R, C = W.shape
    cq = ColumnQuantizer(args, R, C, W.device)
    hdiag = torch.diagonal(H).clone() if mse_importance and args.observer == "mse" else None
    if args.granularity != "group" or static:
        # from the original weight, before the loop
        cq.set(compute_qparams(W, args, name, importance=importance(hdiag, args, C)))

    perm = activation_order(H) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm.unsqueeze(1), perm]  # one [C, C] copy, not two
    col_index = perm.tolist() if perm is not None else list(range(C))

    fac = inverse_cholesky(H, damp, name)
    U = fac.U
    del H

    Wt = W.t().contiguous()
    del W
    gs = args.group_size if args.granularity == "group" and not static else None  # groups fitted as reached

    def target(blk: SweepBlock, i: int, w: torch.Tensor, q: torch.Tensor) -> None:
        j = blk.i1 + i
        if gs and j % gs == 0:
            cq.fit_group(blk.current(i, j, j + gs).t(), j // gs, None if hdiag is None else hdiag[j : j + gs])
        cq.quantize_into(w, col_index[j], q)

    Qt, Et = column_sweep(Wt, U, block_size, target)
    loss = float(Et.double().pow(2).sum() / 2)
    Q = Qt.t()
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(
        weight=Q.contiguous(),
        qparams=cq.qparams(),
        damp=fac.damp,
        damp_retries=fac.retries,
        loss=loss,
        dead=int(dead.sum()),
        perm=perm,
        fallback=fac.fallback,
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
