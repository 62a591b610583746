"""Non-uniform (codebook) quantization of one weight: the maths of the ``squeezellm`` method.

Every row of W [R, C] (or every group of ``group_size`` columns of a row) gets its own
table of K = 2^b values, fitted by weighted 1-D k-means (:mod:`llmpress.quant.kmeans`) with
the sensitivity of each weight as its weight; a weight is stored as the index of its table
entry (b bits) and the tables in float16.

Sensitivity (``sensitivity``): ``hessian_diag`` weighs weight (o, j) by H_jj = 2/n ||X_j||^2,
the diagonal of the layer Hessian: the term (w - q)^2 H_jj is what the weight's error adds to
the layer's output error ||(W - Q) X||^2 when the errors of a row's weights are taken as
uncorrelated; ``fisher`` (SqueezeLLM's own choice) weighs it by F_oj = mean g_oj^2, the
diagonal of the Fisher information of the next-token loss (the ``weight_importance`` stage
before it measures it on calibration windows): the same second-order term measured on the
model's loss instead of the layer's output, so it also sees how much the rest of the network
amplifies or forgives each output row; ``uniform``: plain k-means. A weight of zero
sensitivity (a dead input, a zero gradient) counts as a rare one, 1e-3 of the layer's mean,
not a free one.

Dense-and-sparse (``outlier_fraction``): every weight is scored by s_j (w_oj - mean_o)^2 (its
distance from the row's centre on the scale of the error it adds; SqueezeLLM keeps outliers
by magnitude), the top fraction of the layer kept in float16 off the tables, and the tables
fitted without them (weight 0 in the k-means), so they spend their entries on the bulk of
the row. (Scoring by the error the fitted tables leave, as ``outliers`` does for uniform
grids, misses exactly these weights: k-means gives an isolated weight an entry of its own,
at zero error and at the cost of that entry for the rest of the row.)

Solvers:

- :func:`nuq_round`: every weight to its nearest table entry (SqueezeLLM);
- :func:`nuq_gptq`: the tables fitted first (as above), then GPTQ's column sweep
  (:func:`llmpress.quant.sweep.column_sweep`) with the row's table as the grid: column j
  goes to each row's nearest entry and its error is spread onto the columns not yet
  quantized by the OBS update; kept outliers take their current value (rounded to float16)
  and pass on no error but that rounding.

Both return a :class:`NUQResult`: the dequantized weight, its codes, the float16 tables and
the kept outliers (their flat positions), exactly what the ``codebook`` storage form stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .hessian import inverse_cholesky, prepare
from .kmeans import DEFAULT_BINS, check_bits, fp16_codebook, kmeans_1d
from .sweep import SweepBlock, activation_order, column_sweep, solver_threads, validate_solver_fields

SENSITIVITIES = ("hessian_diag", "uniform", "fisher")
FLOOR = 1e-3  # a zero sensitivity counts as this share of the layer's mean
VALUE_BITS, INDEX_BITS, ROWPTR_BITS = 16, 16, 32  # kept outliers, stored as CSR


@dataclass(kw_only=True)
class NUQResult:
    weight: torch.Tensor  # [R, C] float32: table[codes], kept outliers at their float16 values
    codes: torch.Tensor  # [R, C] uint8: index into the row's (group's) table
    table: torch.Tensor  # [R, G, K] float16, ascending
    outliers: torch.Tensor  # int64 [nnz]: sorted flat positions of the weights kept off the tables
    loss: float | None = None  # GPTQ's OBS error estimate (None when rounding)
    damp: float | None = None


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the round(fraction * numel) highest scores (exactly that many)."""
    k = int(round(fraction * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k).indices] = True
    return mask.reshape(scores.shape)


def csr_bits(nnz: int, rows: int) -> int:
    """Bits of ``nnz`` kept weights as CSR (16-bit value and column, 32-bit row pointers; none when empty)."""
    return nnz * (VALUE_BITS + INDEX_BITS) + (rows + 1) * ROWPTR_BITS if nnz else 0


def codebook_bits(rows: int, cols: int, bits: int, groups: int, nnz: int = 0) -> int:
    """Bits of a codebook-quantized [rows, cols] weight: b-bit codes, ``groups`` float16 tables of
    2^b entries per row, kept outliers as CSR."""
    return rows * cols * bits + rows * groups * (1 << bits) * 16 + csr_bits(nnz, rows)


def column_sensitivity(hessian: torch.Tensor | None, kind: str, cols: int) -> torch.Tensor | None:
    """Per-input-column weights of the k-means [C] (None: uniform)."""
    if kind not in SENSITIVITIES:
        raise UserError(f"sensitivity {kind!r} unknown; expected one of {', '.join(SENSITIVITIES)}")
    if kind == "uniform":
        return None
    if kind == "fisher":
        raise UserError("sensitivity 'fisher' is per weight: use weight_sensitivity with a weight_importance stage's scores")
    if hessian is None:
        raise UserError("sensitivity 'hessian_diag' needs the layer Hessian (calibration data)")
    return _floored(torch.diagonal(hessian).float(), torch.ones(cols))


def weight_sensitivity(importance: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Per-weight k-means weights [R, C] from a ``weight_importance`` stage's Fisher scores."""
    if not bool(torch.isfinite(importance).all()):
        raise UserError(f"{'layer ' + name + ': ' if name else ''}the weight importance holds non-finite values (a diverged gradient pass)")
    return _floored(importance.float(), torch.ones_like(importance, dtype=torch.float32))


def _floored(d: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``d`` clamped at 0 and at FLOOR times the mean of its positive entries (all zero: ``dead``)."""
    d = d.clamp(min=0)
    live = d[d > 0]
    # a dead input (never active in the calibration text) counts as a rare one, not a free one
    return d.clamp(min=FLOOR * float(live.mean())) if live.numel() else dead


def check_shape(cols: int, bits: int, group_size: int | None, where: str = "") -> int:
    """The number of groups per row, or a UserError (group not dividing the row, or fewer
    weights in a group than table entries)."""
    k = check_bits(bits)
    g = cols if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or cols % g:
        raise UserError(f"{where}group_size {group_size!r} does not divide the input dimension {cols}")
    if k > g:
        raise UserError(
            f"{where}{bits} bits = {k} table entries for {'rows' if group_size is None else 'groups'} of {g} weights: use fewer bits or a larger group"
        )
    return cols // g


def fit_codebooks(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    col_weights: torch.Tensor | None,
    keep: torch.Tensor | None = None,
    *,
    bins: int = DEFAULT_BINS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 tables [R, G, K] and nearest codes [R, C] (int64) of ``w`` [R, C], the k-means
    weighted by ``col_weights`` ([C] per input column or [R, C] per weight; None: equal); ``keep``
    (bool [R, C]) marks weights left out of the fit (kept outliers)."""
    R, C = w.shape
    G = check_shape(C, bits, group_size)
    g = C // G
    s = torch.ones(C) if col_weights is None else col_weights.float().to(w.device)
    s = s.expand(R, C)
    if keep is not None:
        s = s.masked_fill(keep, 0.0)
    x = w.float().reshape(R * G, g)
    c, _ = kmeans_1d(x, 1 << bits, s.reshape(R * G, g).contiguous(), bins=bins)
    table, codes = fp16_codebook(x, c)
    return table.reshape(R, G, -1), codes.reshape(R, C)


def lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """table [R, G, K] at codes [R, C] -> float32 [R, C] (column j uses group j // (C / G))."""
    R, G, K = table.shape
    C = codes.shape[1]
    off = (torch.arange(C, device=codes.device) // (C // G) * K).unsqueeze(0)
    return table.reshape(R, G * K).float().gather(1, codes.long() + off)


def outlier_scores(w: torch.Tensor, col_weights: torch.Tensor | None) -> torch.Tensor:
    """s_j (w_oj - mean_o)^2: how far each weight lies from its row's centre, on the scale of
    the error it would add (the weights that stretch a row's tables)."""
    d = (w.float() - w.float().mean(1, keepdim=True)).pow(2)
    return d if col_weights is None else d * col_weights.to(w.device)


def _outliers(w, bits, group_size, s, fraction, bins):
    """(tables, codes, keep mask): the top ``fraction`` of the layer by :func:`outlier_scores`
    kept out of the fit (weight 0 in the k-means)."""
    keep = top_fraction_mask(outlier_scores(w, s), fraction) if fraction > 0 else None
    table, codes = fit_codebooks(w, bits, group_size, s, keep, bins=bins)
    return table, codes, keep


def _result(Q: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, keep: torch.Tensor | None, **kw) -> NUQResult:
    flat = torch.zeros(0, dtype=torch.int64) if keep is None else keep.reshape(-1).nonzero().reshape(-1).cpu()
    return NUQResult(weight=Q.contiguous(), codes=codes.to(torch.uint8), table=table, outliers=flat, **kw)


def nuq_round(
    weight: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    col_weights: torch.Tensor | None = None,
    outlier_fraction: float = 0.0,
    bins: int = DEFAULT_BINS,
) -> NUQResult:
    """Each weight to its nearest table entry (SqueezeLLM; dense-and-sparse with ``outlier_fraction``)."""
    w = weight.detach().float()
    table, codes, keep = _outliers(w, bits, group_size, col_weights, outlier_fraction, bins)
    Q = lookup(table, codes)
    if keep is not None:
        Q = torch.where(keep, w.half().float(), Q)
    return _result(Q, codes, table, keep)


def nuq_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    col_weights: torch.Tensor | None = None,
    outlier_fraction: float = 0.0,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    bins: int = DEFAULT_BINS,
    name: str | None = None,
) -> NUQResult:
    """Tables fitted on the original weight, then GPTQ's column sweep onto them."""
    validate_solver_fields(block_size, damp)
    with solver_threads(weight.device):
        W, H, _ = prepare(weight, hessian, name)
        table, codes, keep = _outliers(W, bits, group_size, col_weights, outlier_fraction, bins)
        R, C = W.shape
        G = table.shape[1]
        perm = activation_order(H) if act_order else torch.arange(C)
        fac = inverse_cholesky(H[perm.unsqueeze(1), perm], damp, name)
        Wt = W[:, perm].t().contiguous()
        tab = table.float().permute(1, 0, 2).contiguous()  # [G, R, K]
        mids = (tab[..., 1:] + tab[..., :-1]) / 2
        kept = None if keep is None else keep[:, perm].t().contiguous()
        cols = perm.tolist()
        codes_t = torch.empty(C, R, dtype=torch.int64, device=W.device)

        def target(blk: SweepBlock, i: int, w: torch.Tensor, q: torch.Tensor) -> None:
            j = blk.i1 + i
            g = cols[j] * G // C
            code = (w.unsqueeze(1) > mids[g]).sum(1)  # nearest entry (a tie takes the lower)
            codes_t[j] = code
            val = tab[g].gather(1, code.unsqueeze(1)).squeeze(1)
            q.copy_(val if kept is None else torch.where(kept[j], w.half().float(), val))

        Qt, Et = column_sweep(Wt, fac.U, block_size, target)
        inv = torch.argsort(perm)
        Q = Qt.t()[:, inv]
        loss = float(Et.double().pow(2).sum() / 2)
    return _result(Q, codes_t.t()[:, inv].contiguous(), table, keep, loss=loss, damp=fac.damp)
