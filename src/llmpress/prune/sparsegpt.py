"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS error compensation.

Same column sweep as GPTQ (:func:`llmpress.quant.sweep.column_sweep`): column i of every row is set
to its target (0 where the mask prunes it, else its own value, or its grid value when
quantizing jointly) and the error ``(w_i - target) / U_ii`` is spread onto the columns
not yet processed with row i of U, the upper Cholesky factor of the damped inverse
Hessian; blocks of columns get their updates lazily in one GEMM.

Mask selection is adaptive: it is made from the *current* (already compensated) weights
with the OBS saliency ``w_j^2 / [H^-1]_jj`` where ``[H^-1]_jj = U_jj^2`` is the diagonal
of the inverse Hessian of the columns still free at that point.

- unstructured: at the start of each block of ``block_size`` columns, the lowest-scored
  weights of the whole block (all rows together) are pruned; the count per block is
  chosen so the layer's total is exactly ``round(sparsity * rows * cols)``;
- N:M: when the sweep reaches each run of ``m`` consecutive columns, each row keeps its
  ``n`` highest-scored weights of the run (2:4, 4:8).

With ``weights`` (QuantArgs) the kept weights are quantized in the same pass (joint
sparsity + quantization; scales from the original weight, see ``static_groups``);
pruned weights are exact zeros of the grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import RecipeError, UserError
from ..quant.args import QuantArgs, check_group_divides
from ..quant.core import QParams, compute_qparams
from ..quant.hessian import inverse_cholesky, layer_error, prepare, regularize
from ..quant.sweep import (
    ColumnQuantizer,
    SweepBlock,
    activation_order,
    column_sweep,
    importance,
    record_solver_notes,
    solver_threads,
    validate_regularizers,
    validate_solver_fields,
)
from ..registry import ModuleContext, register
from .masks import describe_pattern, effective_sparsity, nm_prune_mask, sparsity_of, topk_prune_mask, validate_pattern

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class SparseGPT:
    """SparseGPT stage config: ``sparsity`` (unstructured fraction) or ``n``:``m``
    (keep n of every m consecutive input weights; when set, ``sparsity`` is ignored),
    optional joint weight quantization ``weights``. ``per_row``: unstructured masks
    compare scores within each output row of a column block (every row pruned to the
    same sparsity, as Wanda compares) instead of across the whole block (the paper).
    ``refit``: once the mask is final, solve each row's kept weights exactly
    (:func:`refit_to_mask`) instead of keeping the sweep's one-directional updates."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    block_size: int = 128
    damp: float = 0.01
    weights: QuantArgs | None = None
    per_row: bool = False
    act_order: bool = False
    refit: bool = False
    shrink: float = 0.0  # H <- (1 - shrink) H + shrink diag(H), as GPTQ's: less trust in the calibration text's correlations

    def __post_init__(self):
        validate_pattern(self.sparsity, self.n, self.m)
        if self.refit and self.weights is not None:
            raise RecipeError("refit: solves the kept weights in float; not with joint quantization (weights)")
        if self.act_order and self.m:
            raise RecipeError("act_order: N:M patterns are defined on the original column order; use act_order with unstructured sparsity")
        validate_solver_fields(self.block_size, self.damp)
        validate_regularizers(self.shrink, 0.0)
        if self.weights is not None:
            _check_weight_args(self.weights)


def _check_weight_args(args: QuantArgs) -> None:
    if args.granularity == "token":
        raise RecipeError("weights.granularity: 'token' is for activations; use tensor, channel or group")
    if args.kind == "binary":
        raise RecipeError("weights.kind: binary has no zero level, so it cannot hold pruned weights; use int or ternary")


@dataclass(kw_only=True)
class SparseGPTResult:
    weight: torch.Tensor  # [R, C] float32 (pruned, and dequantized when quantizing)
    mask: torch.Tensor  # [R, C] bool, True where pruned
    qparams: QParams | None
    damp: float
    damp_retries: int
    loss: float  # OBS estimate: sum of (w - target)^2 / (2 [H^-1]_qq)
    dead: int = 0
    fallback: bool = False

    @property
    def sparsity(self) -> float:
        return sparsity_of(self.weight)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    *,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    weights: QuantArgs | None = None,
    static_groups: bool = True,
    per_row: bool = False,
    act_order: bool = False,
    refit: bool = False,
    shrink: float = 0.0,
    name: str | None = None,
) -> SparseGPTResult:
    """SparseGPT on one weight [out, in] with the layer Hessian [in, in] (2/n X^T X).

    ``static_groups`` (joint quantization with groups): group scales from the original
    weight before the loop, as GPTQ's default; False fits each group when the sweep
    reaches it, on its current weights with the pruned ones (known so far) left out.
    ``per_row``: unstructured masks chosen within each row of a block (same sparsity
    for every row) rather than across the block's rows. ``act_order``: sweep the columns
    by descending Hessian diagonal (as GPTQ's activation order; unstructured only, and
    with static group scales when quantizing jointly). ``refit`` (no joint quantization):
    re-solve the kept weights for the final mask, see :func:`refit_to_mask`. ``shrink``:
    the Hessian shrunk toward its diagonal before the sweep and the refit, as GPTQ's (1 keeps
    only the diagonal: the mask is then Wanda's, per row, and nothing is compensated).
    """
    validate_pattern(sparsity, n, m)
    validate_solver_fields(block_size, damp)
    validate_regularizers(shrink, 0.0)
    where = f"layer {name}: " if name else ""
    R, C = weight.shape
    if m:
        if C % m:
            raise UserError(f"{where}{n}:{m} sparsity needs the input dimension ({C}) to be a multiple of {m}")
        block_size = max(m, block_size // m * m)  # runs of m columns never straddle blocks
    cq = None
    dynamic = False
    if weights is not None:
        try:
            _check_weight_args(weights)
        except RecipeError as e:
            raise UserError(f"{where}{e}") from None
        check_group_divides(weights, C, where)
        dynamic = weights.granularity == "group" and not static_groups
    if act_order and (m or dynamic):
        raise UserError(f"{where}act_order needs unstructured sparsity and static group scales")
    if refit and weights is not None:
        raise UserError(f"{where}refit solves float weights; it does not combine with joint quantization")
    with solver_threads(weight.device):
        W, H, dead = prepare(weight, hessian, name)
        regularize(H, shrink=shrink)
        if weights is not None:
            cq = ColumnQuantizer(weights, R, C, W.device)
            if not dynamic:
                hd = torch.diagonal(H) if weights.takes_importance else None  # as GPTQ: the mse / lsq search weighted by diag(H)
                cq.set(compute_qparams(W, weights, name, importance=importance(hd, weights, C)))
        W0, H0 = (W.clone(), H) if refit else (None, None)
        perm = activation_order(H) if act_order else None
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]
        res = _sparsegpt(W, H, dead, sparsity, n, m, block_size, damp, cq, dynamic, name, per_row, perm)
        if perm is not None:
            inv = torch.argsort(perm)
            res.weight, res.mask = res.weight[:, inv].contiguous(), res.mask[:, inv].contiguous()
        if refit:
            res.weight = refit_to_mask(W0, H0, res.mask, res.damp, swept=res.weight)
            res.loss = layer_error(W0, res.weight, H0) / 2
        return res


def refit_to_mask(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    mask: torch.Tensor,
    damp: float = 0.01,
    swept: torch.Tensor | None = None,
    max_chunk_bytes: int = 1 << 28,
) -> torch.Tensor:
    """The kept weights that minimize ``tr((W - W0) H (W - W0)^T)`` for a fixed mask.

    Row r with kept columns K and pruned P (w_P = 0): ``w_K = w0_K + H_KK^-1 H_KP w0_P``
    (H damped by ``damp`` x its mean diagonal, as the sweep). SparseGPT's column sweep
    only updates columns to the right of each pruned one, so once the mask is final the
    left part is no longer optimal; this solves every row exactly (one k x k Cholesky per
    row, batched over rows that keep the same number of weights). Rows whose system is
    not positive definite in float32 keep ``swept`` (the sweep's result), if given.
    """
    W0 = weight.detach().float()
    R, C = W0.shape
    H = hessian.detach().to(W0.device, torch.float32).clone()
    idx = torch.arange(C, device=H.device)
    H[idx, idx] += float(damp) * (float(torch.diagonal(H).abs().mean()) or 1.0)
    keep = ~mask.to(W0.device)
    out = (swept.detach().float().clone() if swept is not None else W0).masked_fill(~keep, 0.0)
    rhs_all = (W0 * (~keep)) @ H  # row r: H w0_P (pruned values only), gathered at K below
    counts = keep.sum(1)
    for k in torch.unique(counts).tolist():
        rows = (counts == k).nonzero().squeeze(1)
        if k == 0 or k == C:
            continue
        step = max(1, int(max_chunk_bytes // (4 * k * k)))
        for c0 in range(0, rows.numel(), step):
            r = rows[c0 : c0 + step]
            K = keep[r].nonzero()[:, 1].view(r.numel(), k)
            HKK = H[K.unsqueeze(2), K.unsqueeze(1)]
            L, info = torch.linalg.cholesky_ex(HKK)
            if int(info.max()) != 0:  # not positive definite in float32: these rows stay as they were
                continue
            delta = torch.cholesky_solve(rhs_all[r.unsqueeze(1), K].unsqueeze(-1), L).squeeze(-1)
            out[r.unsqueeze(1), K] = W0[r.unsqueeze(1), K] + delta
    return out


def _sparsegpt(W, H, dead, sparsity, n, m, block_size, damp, cq, dynamic, name, per_row=False, perm=None) -> SparseGPTResult:
    R, C = W.shape
    col = perm.tolist() if perm is not None else range(C)  # original index of each swept column
    gs = cq.gsize if dynamic else None
    hdiag = torch.diagonal(H).clone() if dynamic else None
    fac = inverse_cholesky(H, damp, name)
    U = fac.U
    del H

    target_total = int(round(sparsity * R * C))
    pruned = 0
    # transposed layout: column j of W is row j of Wt (contiguous); masks likewise
    Wt = W.t().contiguous()
    del W
    Mt = torch.zeros(C, R, dtype=torch.bool, device=Wt.device)
    dsq = None  # [H^-1]_jj of the columns still free, per row of the current block

    def start_block(blk: SweepBlock) -> None:
        nonlocal pruned, dsq
        i1, i2, W1, M1 = blk.i1, blk.i2, blk.W1, Mt[blk.i1 : blk.i2]
        dsq = torch.diagonal(blk.U1).pow(2).unsqueeze(1)
        if not m and per_row:  # each row (a column of W1) prunes its share of this block
            k = int(round(sparsity * i2)) - int(round(sparsity * i1))
            if k > 0:
                M1.scatter_(0, torch.topk(W1.pow(2) / dsq, k, dim=0, largest=False).indices, True)
        elif not m:
            k = int(round(sparsity * R * i2)) - pruned if i2 < C else target_total - pruned
            k = max(0, min(k, R * (i2 - i1)))
            M1.copy_(topk_prune_mask(W1.pow(2) / dsq, k))
            pruned += k

    def target(blk: SweepBlock, i: int, w: torch.Tensor, q: torch.Tensor) -> None:
        j = blk.i1 + i
        M1 = Mt[blk.i1 : blk.i2]
        if m and i % m == 0:
            M1[i : i + m] = nm_prune_mask((blk.W1[i : i + m].pow(2) / dsq[i : i + m]).t(), n, m).t()
        if dynamic and j % gs == 0:
            cols = blk.current(i, j, j + gs).clone()
            known = M1[i : i + cols.shape[0]]  # masks of the group's columns chosen so far
            cols[: known.shape[0]].masked_fill_(known, 0.0)
            cq.fit_group(cols.t(), j // gs, hdiag[j : j + gs] if cq.args.takes_importance else None)
        mk = M1[i]
        if cq is None:
            q.copy_(w).masked_fill_(mk, 0.0)
        else:
            cq.quantize_into(w.masked_fill(mk, 0.0), col[j], q).masked_fill_(mk, 0.0)

    Qt, Et = column_sweep(Wt, U, block_size, target, start_block)
    loss = float(Et.double().pow(2).sum() / 2)
    return SparseGPTResult(
        weight=Qt.t().contiguous(),
        mask=Mt.t().contiguous(),
        qparams=None if cq is None else cq.qparams(),
        damp=fac.damp,
        damp_retries=fac.retries,
        loss=loss,
        dead=int(dead.sum()),
        fallback=fac.fallback,
    )


@register(
    "sparsegpt",
    SparseGPT,
    needs=("hessian",),
    summary="SparseGPT: one-shot pruning (unstructured or N:M) with OBS compensation, optionally joint quantization",
)
def sparsegpt(ctx: ModuleContext, cfg: SparseGPT) -> None:
    sparsity = effective_sparsity(cfg.sparsity, ctx.settings.get("sparsity_offset"), cfg.m)
    res = sparsegpt_prune(
        ctx.weight,
        ctx.stats["hessian"],
        sparsity,
        n=cfg.n,
        m=cfg.m,
        block_size=cfg.block_size,
        damp=cfg.damp,
        weights=cfg.weights,
        per_row=cfg.per_row,
        act_order=cfg.act_order,
        refit=cfg.refit,
        shrink=cfg.shrink,
        name=ctx.name,
    )
    ctx.set_weight(res.weight)
    rec = ctx.record
    rec.sparsity = res.sparsity
    rec.notes["pattern"] = describe_pattern(sparsity, cfg.n, cfg.m)
    record_solver_notes(rec, res, "sparsegpt_loss")
    if cfg.weights is not None:
        rec.weight_args = cfg.weights
        rec.qparams = res.qparams
