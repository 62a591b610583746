"""The GPTQ solve on one weight (the maths of :mod:`llmpress.quant.gptq`, which registers the
method): below the methods, so other methods (GPTQ on low-rank factors) call it too."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .args import QuantArgs, check_group_divides
from .core import QParams, compute_qparams
from .hessian import inverse_cholesky, prepare, regularize
from .sweep import ColumnQuantizer, SweepBlock, activation_order, column_sweep, importance, solver_threads, validate_solver_fields


@dataclass(kw_only=True)
class GPTQResult:
    weight: torch.Tensor  # [R, C] float32, dequantized
    qparams: QParams | None  # None: a grid of another form, handed back beside the result (Q4_K)
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

    ``mse_importance``: with an observer that searches the scale (``mse``, ``lsq``), weight
    each column's error by ``H_jj`` (its input's mean square, llama.cpp's importance matrix),
    so the scales favour the columns that feed large activations. ``shrink``: solve with ``(1 - shrink) H + shrink diag(H)`` (1: no error
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
        regularize(H, shrink=shrink, diag_floor=diag_floor)
        return _gptq(W, H, dead, args, block_size, damp, act_order, static, mse_importance, name)


def _gptq(W, H, dead, args, block_size, damp, act_order, static, mse_importance, name) -> GPTQResult:
    R, C = W.shape
    cq = ColumnQuantizer(args, R, C, W.device)
    hdiag = torch.diagonal(H).clone() if mse_importance and args.takes_importance else None
    if args.granularity != "group" or static:
        # from the original weight, before the loop
        cq.set(compute_qparams(W, args, name, importance=importance(hdiag, args, C)))
    gs = args.group_size if args.granularity == "group" and not static else None  # groups fitted as reached

    def target(blk: SweepBlock, i: int, col: int, w: torch.Tensor, q: torch.Tensor) -> None:
        j = blk.i1 + i
        if gs and j % gs == 0:
            cq.fit_group(blk.current(i, j, j + gs).t(), j // gs, None if hdiag is None else hdiag[j : j + gs])
        cq.quantize_into(w, col, q)

    return sweep_solve(W, H, dead, target, qparams=cq.qparams, block_size=block_size, damp=damp, act_order=act_order, name=name)


def sweep_solve(W, H, dead, target, *, qparams, block_size: int, damp: float, act_order: bool, name: str | None) -> GPTQResult:
    """GPTQ's loop on prepared ``W`` [R, C] / ``H`` (both given up): the columns in activation
    order (or as they are), the inverse Cholesky factor, the OBS sweep with ``target(blk, i,
    col, w, q)`` writing column ``col``'s grid value of ``w`` into ``q``, the columns put back.
    ``qparams()`` gives the result's grid once the sweep is done (Q4_K: None, its grid is
    handed back beside the result)."""
    C = W.shape[1]
    perm = activation_order(H) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm.unsqueeze(1), perm]  # one [C, C] copy, not two
    col_index = perm.tolist() if perm is not None else list(range(C))
    fac = inverse_cholesky(H, damp, name)
    del H
    Wt = W.t().contiguous()
    del W
    Qt, Et = column_sweep(Wt, fac.U, block_size, lambda blk, i, w, q: target(blk, i, col_index[blk.i1 + i], w, q))
    loss = float(Et.double().pow(2).sum() / 2)
    Q = Qt.t()
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(
        weight=Q.contiguous(),
        qparams=qparams(),
        damp=fac.damp,
        damp_retries=fac.retries,
        loss=loss,
        dead=int(dead.sum()),
        perm=perm,
        fallback=fac.fallback,
    )
