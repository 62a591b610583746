"""The OBS column sweep shared by GPTQ and SparseGPT, and its per-column quantizer.

Both solvers take the columns of ``W`` [R, C] in one fixed order and, for column i, set
every row's weight to a target (its grid value for GPTQ; 0 where the mask prunes it, else
its own or its grid value for SparseGPT) and spread the error onto the columns not yet
processed with the OBS update

    e = (w_i - target_i) / U_ii,    W[:, i+1:] -= e U[i, i+1:]

where U is the upper Cholesky factor of the damped inverse Hessian
(:func:`llmpress.quant.hessian.inverse_cholesky`). Columns go in blocks of
``block_size``: inside a block the updates are rank-one and touch only the block; the
columns past it get the block's accumulated errors in one GEMM (lazy batch update).
:func:`column_sweep` runs that loop; the solver supplies the target of each column (and,
optionally, work at the start of each block, e.g. SparseGPT's mask selection).

Everything works on the transposed weight ``Wt`` [C, R] (column j of W is the contiguous
row j of Wt).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import RecipeError, UserError
from .args import QuantArgs
from .core import QParams, _codes, _dequant, compute_qparams


def validate_solver_fields(block_size, damp) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise RecipeError(f"block_size={block_size!r}: expected a positive integer")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0.0 <= damp < 10.0:
        raise RecipeError(f"damp={damp!r}: expected a fraction of the mean Hessian diagonal in [0, 10)")


def validate_regularizers(shrink, diag_floor) -> None:
    """``shrink`` and ``diag_floor`` (hessian.regularize) are fractions in [0, 1]."""
    for key, v in (("shrink", shrink), ("diag_floor", diag_floor)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise RecipeError(f"{key}={v!r}: expected a fraction in [0, 1]")


def activation_order(H: torch.Tensor) -> torch.Tensor:
    """Column processing order by descending Hessian diagonal (ties: original order)."""
    return torch.argsort(torch.diagonal(H), descending=True, stable=True)


def importance(hdiag, args: QuantArgs, C: int):
    """diag(H) shaped for compute_qparams's group view of a [R, C] weight."""
    if hdiag is None:
        return None
    if args.granularity == "group":
        return hdiag.reshape(1, C // args.group_size, args.group_size)
    return hdiag.reshape(1, 1, C)


class ColumnQuantizer:
    """Quantize one weight column at a time with the scale/zero/threshold of its group.

    Params are held transposed ([n_groups, rows]) so a column's are one contiguous row;
    the integer path repeats :mod:`llmpress.quant.core`'s arithmetic op for op
    (``round(w / s) + z``, clamp, ``(q - z) * s``), so the codes are the ones
    ``quantize`` gives.
    """

    def __init__(self, args: QuantArgs, rows: int, cols: int, device):
        self.args = args
        self.rows = rows
        self.gsize = args.group_size if args.granularity == "group" else None
        self.n_groups = 1 if args.granularity in ("tensor", "channel") else cols // args.group_size
        self.st = torch.zeros(self.n_groups, rows, device=device)
        self.zt = torch.zeros(self.n_groups, rows, device=device) if args.has_zero_point else None
        self.tt = torch.zeros(self.n_groups, rows, device=device) if args.kind == "ternary" else None
        self.fixed: QParams | None = None  # per-tensor params as computed ([1, 1])
        # argument set for computing one group's params from a [R, g] slice
        self.slice_args = (
            dataclasses.replace(args, granularity="channel", group_size=None, super_block=None, group_scale_bits=8) if self.gsize else args
        )

    def group_of(self, col: int) -> int:
        return col // self.gsize if self.gsize else 0

    def set(self, qp: QParams, g: int | None = None) -> None:
        """Store params for all groups (g None: qp is [R or 1, G]) or for group g (qp [R, 1])."""
        if self.args.granularity == "tensor":
            self.fixed = qp
        sl = slice(None) if g is None else slice(g, g + 1)
        for dst, src in ((self.st, qp.scale), (self.zt, qp.zero_point), (self.tt, qp.threshold)):
            if dst is not None:
                dst[sl] = src.t().expand(-1, self.rows) if src.shape[0] == 1 else src.t()

    def fit_group(self, cols: torch.Tensor, g: int, importance: torch.Tensor | None = None) -> None:
        """Params of group g from its current values ``cols`` [R, group_size]; ``importance``
        [group_size] weights the mse / lsq observer's error per column."""
        if self.args.super_block:
            raise UserError(
                "two-level scales (super_block) are fitted for a whole super-block at once: use static_groups: true "
                "(the groups' scales from the original weight)"
            )
        imp = None if importance is None else importance.reshape(1, 1, -1)
        self.set(compute_qparams(cols, self.slice_args, importance=imp), g)

    def quantize_into(self, w: torch.Tensor, col: int, out: torch.Tensor) -> torch.Tensor:
        """Write the dequantized value of column ``w`` [R] (original index ``col``) into ``out``."""
        g = col // self.gsize if self.gsize else 0
        a = self.args
        s = self.st[g]
        if a.kind == "int":
            torch.div(w, s, out=out).round_()
            if self.zt is not None:
                z = self.zt[g]
                out.add_(z).clamp_(a.qmin, a.qmax).sub_(z)
            else:
                out.clamp_(a.qmin, a.qmax)
            return out.mul_(s)
        qp = QParams(scale=s.unsqueeze(1), zero_point=None, threshold=None if self.tt is None else self.tt[g].unsqueeze(1))
        out.copy_(_dequant(_codes(w.reshape(-1, 1, 1), qp, a), qp).reshape(-1))
        return out

    def qparams(self) -> QParams:
        if self.fixed is not None:
            return self.fixed
        t = lambda x: None if x is None else x.t().contiguous()  # noqa: E731
        return QParams(scale=t(self.st), zero_point=t(self.zt), threshold=t(self.tt))


@contextlib.contextmanager
def solver_threads(device: torch.device):
    """One intra-op thread on CPU during a column sweep: its ops are small and many, and
    with a busy machine OpenMP's barriers between two threads cost milliseconds each."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def current_rows(Wt, E1, U, i1: int, i: int, i2: int, c0: int, c1: int) -> torch.Tensor:
    """Up-to-date values of columns [c0, c1) (as rows of the transposed weight, [c1-c0, R])
    while column i1+i of the block [i1, i2) is next.

    Columns inside the block are updated column by column; columns past the block have
    not received this block's updates yet (lazy batch): apply the pending part here.
    """
    inside = Wt[c0 : min(c1, i2)]
    if c1 <= i2:
        return inside
    beyond = Wt[i2:c1]
    if i > 0:
        beyond = beyond - U[i1 : i1 + i, i2:c1].t() @ E1[:i]
    return torch.cat([inside, beyond], dim=0)


@dataclass(kw_only=True)
class SweepBlock:
    """One block [i1, i2) of the sweep as the target callbacks see it: ``W1``/``E1`` are the
    block's rows of the (transposed) weight and error, ``U1`` its diagonal block of U."""

    Wt: torch.Tensor
    U: torch.Tensor
    i1: int
    i2: int
    W1: torch.Tensor
    E1: torch.Tensor
    U1: torch.Tensor

    def current(self, i: int, c0: int, c1: int) -> torch.Tensor:
        """Up-to-date values of columns [c0, c1) while column i1+i is next (see :func:`current_rows`)."""
        return current_rows(self.Wt, self.E1, self.U, self.i1, i, self.i2, c0, c1)


def column_sweep(
    Wt: torch.Tensor,
    U: torch.Tensor,
    block_size: int,
    target: Callable[[SweepBlock, int, torch.Tensor, torch.Tensor], None],
    start_block: Callable[[SweepBlock], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS sweep over the rows of ``Wt`` [C, R] (updated in place), with U [C, C].

    ``target(blk, i, w, q)`` writes into ``q`` [R] the value column ``blk.i1 + i`` takes,
    given its current value ``w``; ``start_block(blk)`` runs before a block's first column.
    Returns ``(Qt, Et)``: the targets [C, R] and the scaled errors ``(w - q) / U_ii`` [C, R]
    (the OBS loss estimate is ``sum(Et^2) / 2``).
    """
    C = Wt.shape[0]
    Qt = torch.empty_like(Wt)
    Et = torch.empty_like(Wt)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        nb = i2 - i1
        W1 = Wt[i1:i2]
        E1 = Et[i1:i2]
        U1 = U[i1:i2, i1:i2]
        blk = SweepBlock(Wt=Wt, U=U, i1=i1, i2=i2, W1=W1, E1=E1, U1=U1)
        if start_block is not None:
            start_block(blk)
        d = torch.diagonal(U1).tolist()
        wr, qr, er = W1.unbind(0), Qt[i1:i2].unbind(0), E1.unbind(0)
        for i in range(nb):
            w, q, e = wr[i], qr[i], er[i]
            target(blk, i, w, q)
            torch.sub(w, q, out=e).div_(d[i])
            if i + 1 < nb:
                W1[i + 1 :].addr_(U1[i, i + 1 :], e, alpha=-1.0)
        if i2 < C:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
    return Qt, Et


def record_solver_notes(rec, res, loss_key: str) -> None:
    """The second-order solvers' layer notes: dampening used, retries, OBS loss estimate,
    dead inputs and the diagonal fallback when they happened."""
    rec.notes["damp"] = res.damp
    rec.notes["damp_retries"] = res.damp_retries
    rec.notes[loss_key] = res.loss
    if res.dead:
        rec.notes["dead_inputs"] = res.dead
    if res.fallback:
        rec.notes["hessian_fallback"] = "diagonal"
