"""Vector quantization with Hessian error feedback (GPTVQ, van Baalen et al., 2024): the maths
of the ``gptvq`` method.

A weight W [R, C] is cut into vectors of ``dim`` = d consecutive input columns of one row,
v = W[o, j:j+d] (j a multiple of d). Every group of ``group_size`` input columns (all rows;
None: the whole layer) has one float16 codebook of K = 2^(d b) entries of d values; each vector is stored as the
(d b)-bit index of its codeword, i.e. b bits per weight, plus K d 16 bits per group for the
table. With ``row_scale`` each row is first divided by its float16 RMS s_o (GPTVQ's
normalization: rows of different scale share the tables), the codeword values multiplied back,
q = s_o c (one float16 per row more).

1. **Codebook initialization** (:func:`kmeans_vq`): k-means on the group's R g / d vectors
   under the Hessian-diagonal-weighted distance sum_t H_{j+t,j+t} (v_t - c_t)^2 (the diagonal
   term of the layer's output error, as SqueezeLLM weighs its scalar k-means); seeded random
   start among the vectors, Lloyd's iterations (empty clusters re-seeded with the worst-served
   vectors).
2. **Assignment with error feedback** (:func:`vq_gptq`): GPTQ's column sweep
   (:func:`llmpress.quant.sweep.column_sweep`) in the natural column order; at the first column
   of each vector the d columns' current values (already updated by every earlier column) go
   jointly to the codeword nearest under the distance of the error they add to the layer's
   output,

       dist(v, c) = (v - c) (U_SS^T U_SS)^-1 (v - c)^T = || (v - c) U_SS^-1 ||^2,

   where H^-1 = U^T U (upper Cholesky factor of the damped inverse Hessian) and S the d
   columns; the sweep then spreads the d errors one column at a time, which is the same as
   the block update W_rest -= (W_S - Q_S) U_SS^-1 U_{S,rest}.
3. **Codebook refinement** (``refine_iters``): with the codes fixed, the tables minimize the
   exact layer error tr((W - Q(T)) H (W - Q(T))^T), a linear least-squares problem in the
   entries T; a few conjugate-gradient steps from the k-means tables (each one GEMM with H)
   only lower it. The tables are then rounded to float16 and Q re-read from them.
4. **Compact tables** (``table_bits=8``, GPTVQ's codebook quantization): each table is stored
   as int8 entries times one float16 scale, s_g = max |T_g| / 127; the k-means start and every
   refined table are rounded so before codes are assigned to them (the sweep sees the values
   the checkpoint holds). K d 8 + 16 bits per table instead of K d 16.

:func:`vq_round` (each vector to its nearest codeword under the H-diagonal distance, the same
tables) is the baseline the error feedback is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .hessian import inverse_cholesky, prepare
from .sweep import SweepBlock, column_sweep, solver_threads, validate_solver_fields

DIMS = (2, 4, 8)
MAX_BITS = 4  # bits per weight
MAX_INDEX_BITS = 12  # at most 4096 codewords per table
TABLE_BITS = 16  # float16 entries
TABLE_BITS_CHOICES = (16, 8)  # float16 tables, or int8 entries with a float16 scale per table
CHUNK = 1 << 22  # distance-matrix elements per slice
KMEANS_BUDGET = 1 << 24  # k-means runs on at most max(KMEANS_BUDGET / k, 64 k) vectors (a seeded sample)
KMEANS_SETTLED = 1e-3  # k-means stops once fewer than this share of the vectors change centroid


@dataclass(kw_only=True)
class VQResult:
    weight: torch.Tensor  # [R, C] float32: the codewords (float16 values)
    codes: torch.Tensor  # [R, C / d] int64: index of each vector's codeword in its group's table
    table: torch.Tensor  # [G, K, d] float16 (G = row groups x column groups, row-group major)
    scale: torch.Tensor | None = None  # [R] float16: each row's codewords are scaled by it (``row_scale``)
    loss: float | None = None  # the layer error tr((W - Q) H (W - Q)^T) after assignment (None: rounding)
    damp: float | None = None
    row_groups: int = 1  # blocks of rows with tables of their own
    table_q: torch.Tensor | None = None  # [G, K, d] int8 (``table_bits=8``): table = table_q * table_scale
    table_scale: torch.Tensor | None = None  # [G] float16


def check_vq(dim, bits) -> int:
    """K = 2^(dim * bits) codewords, or a UserError."""
    if isinstance(dim, bool) or dim not in DIMS:
        raise UserError(f"dim={dim!r}: vector quantization takes vectors of {', '.join(map(str, DIMS))} weights")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise UserError(f"bits={bits!r}: vector quantization takes 1 to {MAX_BITS} bits per weight")
    if dim * bits > MAX_INDEX_BITS:
        raise UserError(f"dim={dim}, bits={bits}: 2^{dim * bits} codewords per table; at most 2^{MAX_INDEX_BITS} (use fewer bits or shorter vectors)")
    return 1 << (dim * bits)


def check_vq_shape(rows: int, cols: int, dim: int, bits: int, group_size, where: str = "", row_group_size=None) -> int:
    """Column groups per row, or a UserError (vector size not dividing the group, group not
    dividing the row, a row group not dividing the rows, fewer vectors in a table's block than
    codewords); ``group_size`` None: one column group; ``row_group_size`` None: all rows share
    each column group's table."""
    k = check_vq(dim, bits)
    g = cols if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise UserError(f"{where}group_size={group_size!r}: expected a positive integer or null")
    if g % dim:
        raise UserError(f"{where}vector size {dim} does not divide the group of {g} columns")
    if cols % g:
        raise UserError(f"{where}group_size {g} does not divide the input dimension {cols}")
    rg = rows if row_group_size is None else row_group_size
    if isinstance(rg, bool) or not isinstance(rg, int) or rg < 1:
        raise UserError(f"{where}row_group_size={row_group_size!r}: expected a positive integer or null")
    if rows % rg:
        raise UserError(f"{where}row_group_size {rg} does not divide the {rows} output rows")
    if rg * g // dim < k:
        raise UserError(f"{where}{k} codewords for groups of {rg * g // dim} vectors: use fewer bits or a larger group")
    return cols // g


def vq_bits(rows: int, cols: int, dim: int, bits: int, groups: int, row_scale: bool = False, table_bits: int = TABLE_BITS) -> int:
    """Bits of a VQ-compressed [rows, cols] weight: b bits per weight of codes, ``groups``
    tables of 2^(d b) codewords of d values (float16, or ``table_bits`` = 8: int8 entries and a
    float16 scale per table), and a float16 scale per row (``row_scale``)."""
    tables = groups * ((1 << (dim * bits)) * dim * table_bits + (TABLE_BITS if table_bits != TABLE_BITS else 0))
    return rows * cols * bits + tables + (rows * TABLE_BITS if row_scale else 0)


def auto_group_size(rows: int, cols: int, dim: int, bits: int, *, table_bits: int = TABLE_BITS, budget: float, row_group_size=None) -> int | None:
    """``group_size: auto``: the smallest group of input columns (a multiple of ``dim`` dividing
    ``cols``, each table's block holding at least as many vectors as codewords) whose tables
    cost at most ``budget`` bits per weight of the layer; None (one column group) when no
    smaller group fits. Small layers thus get few tables and large ones many, at the same
    overhead, whatever their widths."""
    k = 1 << (dim * bits)
    rg = rows if row_group_size is None else row_group_size
    per_table = k * dim * table_bits + (TABLE_BITS if table_bits != TABLE_BITS else 0)
    for g in range(dim, cols, dim):
        if cols % g or rg * g // dim < k:
            continue
        if (cols // g) * (rows // rg) * per_table <= budget * rows * cols:
            return g
    return None


def check_table_bits(table_bits) -> int:
    if isinstance(table_bits, bool) or table_bits not in TABLE_BITS_CHOICES:
        raise UserError(f"table_bits={table_bits!r}: tables are stored in 16 bits (float16) or 8 (int8 times a float16 scale per table)")
    return table_bits


def quantize_tables(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tables [G, K, d] -> (int8 entries, float16 scales [G], the float32 tables they decode to:
    entries times scale, exactly as the checkpoint's reader computes them). s_g = max |T_g| /
    127 rounded to float16 (1 for an all-zero table)."""
    t = table.float()
    s = (t.abs().amax(dim=(1, 2)) / 127).half()
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(t / s.float()[:, None, None]).clamp(-127, 127).to(torch.int8)
    return q, s, dequantize_tables(q, s)


def dequantize_tables(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """int8 entries [G, K, d] times float16 scales [G] -> float32 tables."""
    return q.float() * s.float()[:, None, None]


def table_index(R: int, V: int, G: int, row_groups: int = 1, device=None) -> torch.Tensor:
    """[R, V]: the table of vector v of row o, (o // (R / Gr)) Gc + v // (V / Gc) with
    Gc = G / Gr column groups (tables row-group major)."""
    gc = G // row_groups
    rows = torch.arange(R, device=device) // (R // row_groups) * gc
    return rows.unsqueeze(1) + (torch.arange(V, device=device) // (V // gc)).unsqueeze(0)


def vq_lookup(table: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None = None, row_groups: int = 1) -> torch.Tensor:
    """Tables [G, K, d] at codes [R, C / d] -> float32 [R, C] (vector v lies in columns
    v d .. v d + d - 1; its table: :func:`table_index`), times each row's ``scale`` [R] if given."""
    G, K, d = table.shape
    R, V = codes.shape
    flat = table.float().reshape(G * K, d)
    w = flat[table_index(R, V, G, row_groups, codes.device) * K + codes.long()].reshape(R, V * d)
    return w if scale is None else w * scale.float().to(w.device).unsqueeze(1)


def row_scales(W: torch.Tensor) -> torch.Tensor:
    """float16 [R]: each row's root mean square (1 for an all-zero row)."""
    s = W.float().pow(2).mean(1).sqrt().half()
    return torch.where(s > 0, s, torch.ones_like(s))


def _vectors(w: torch.Tensor, group_size: int, dim: int, row_groups: int = 1) -> torch.Tensor:
    """[Gr Gc, (R / Gr) g / d, d]: the vectors of each block of rows and ``group_size`` columns
    (row-group major, as the tables)."""
    R, C = w.shape
    G = C // group_size
    return w.reshape(row_groups, R // row_groups, G, group_size // dim, dim).permute(0, 2, 1, 3, 4).reshape(row_groups * G, -1, dim)


def _distances(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """sum_t w_t (x_t - c_t)^2 up to a per-row constant: [N, K]."""
    if w is None:
        return torch.addmm((c * c).sum(1), x, c.t(), alpha=-2)
    # one GEMM of inner size 2d: [w, w x] @ [c^2, -2 c]^T (two of size d cost twice the passes)
    return torch.cat([w, w * x], 1) @ torch.cat([c * c, -2 * c], 1).t()


def assign(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest row of ``c`` [K, d] for each row of ``x`` [N, d] under the
    ``w``-weighted distance (w [N, d] or None: Euclidean); in slices of ``CHUNK`` elements."""
    n = max(1, CHUNK // c.shape[0])
    out = [_distances(x[i : i + n], c, None if w is None else w[i : i + n]).argmin(1) for i in range(0, x.shape[0], n)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def kmeans_vq(
    x: torch.Tensor, k: int, weights: torch.Tensor | None = None, *, iters: int = 25, seed: int = 0, budget: int | None = KMEANS_BUDGET
) -> torch.Tensor:
    """Weighted k-means of the vectors ``x`` [N, d] (``weights`` [N, d] >= 0 per coordinate):
    centroids [k, d] float32. With more than n = max(``budget`` / k, 64 k) vectors, a seeded
    sample of n stands in for them (each iteration then costs about ``budget`` distances; None:
    all). Start: k distinct vectors drawn with a seeded generator;
    each iteration assigns every vector to its nearest centroid and moves each centroid,
    coordinate by coordinate, to the weighted mean of its vectors; an empty centroid takes the
    vector served worst. It stops early once fewer than ``KMEANS_SETTLED`` of the vectors
    change centroid in an iteration."""
    x = x.float()
    N, d = x.shape
    if k > N:
        raise UserError(f"{k} codewords for {N} vectors")
    w = torch.ones_like(x) if weights is None else weights.float().clamp(min=0)
    g = torch.Generator().manual_seed(seed)
    n = N if budget is None else max(budget // k, 64 * k)
    if N > n:
        pick = torch.randperm(N, generator=g)[:n].to(x.device)
        x, w, N = x[pick], w[pick], n
    c = x[torch.randperm(N, generator=g)[:k].to(x.device)].clone()
    prev = None
    for _ in range(iters):
        a = assign(x, c, w)
        if prev is not None and int((a != prev).sum()) < KMEANS_SETTLED * N:
            break
        prev = a
        num = torch.zeros(k, d, device=x.device).index_add_(0, a, w * x)
        den = torch.zeros(k, d, device=x.device).index_add_(0, a, w)
        new = torch.where(den > 0, num / den.clamp(min=1e-30), c)
        empty = (torch.bincount(a, minlength=k) == 0).nonzero().squeeze(1)
        if empty.numel():
            err = (w * (x - c[a]).pow(2)).sum(1)
            new[empty] = x[torch.topk(err, empty.numel()).indices]
        if torch.equal(new, c):
            break
        c = new
    return c


def init_tables(
    W: torch.Tensor, weights: torch.Tensor, dim: int, bits: int, group_size: int, *, iters: int, seed: int, row_groups: int = 1
) -> torch.Tensor:
    """float16 tables [G, K, d]: k-means of each block's vectors of ``W`` [R, C], each weight
    counted with ``weights`` [R, C] (H_jj, times s_o^2 for scaled rows)."""
    k = 1 << (dim * bits)
    xs, ws = _vectors(W, group_size, dim, row_groups), _vectors(weights.float().to(W.device), group_size, dim, row_groups)
    return torch.stack([kmeans_vq(xs[i], k, ws[i], iters=iters, seed=seed + i) for i in range(xs.shape[0])]).half()


def _codes_of(table: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, R: int, dim: int, group_size: int, row_groups: int = 1) -> torch.Tensor:
    """Codes [R, C / d] of the grouped vectors ``x`` [Gr Gc, (R / Gr) g / d, d]."""
    G = table.shape[0]
    codes = torch.stack([assign(x[i], table[i].float(), None if w is None else w[i]) for i in range(G)])
    return codes.reshape(row_groups, G // row_groups, R // row_groups, group_size // dim).permute(0, 2, 1, 3).reshape(R, -1)


def _normalized(W: torch.Tensor, hdiag: torch.Tensor, row_scale: bool):
    """(rows scaled to unit RMS or as they are, the k-means weights H_jj s_o^2 [R, C], the scales or None)."""
    R, C = W.shape
    hd = hdiag.float().clamp(min=0).to(W.device).expand(R, C)
    if not row_scale:
        return W, hd, None
    s = row_scales(W)
    sf = s.float().unsqueeze(1)
    return W / sf, hd * sf * sf, s


def vq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    dim: int,
    bits: int,
    *,
    group_size: int | None,
    row_scale: bool = False,
    table: torch.Tensor | None = None,
    kmeans_iters: int = 25,
    seed: int = 0,
    row_group_size: int | None = None,
) -> VQResult:
    """Each vector to its nearest codeword under the H-diagonal-weighted distance (no error
    feedback); ``table`` [G, K, d] given or fitted as in :func:`vq_gptq`."""
    R, C = weight.shape
    check_vq_shape(R, C, dim, bits, group_size, row_group_size=row_group_size)
    group_size = C if group_size is None else group_size
    rgs = R // (R if row_group_size is None else row_group_size)
    Wn, wts, s = _normalized(weight.detach().float(), torch.diagonal(hessian), row_scale)
    if table is None:
        table = init_tables(Wn, wts, dim, bits, group_size, iters=kmeans_iters, seed=seed, row_groups=rgs)
    codes = _codes_of(table, _vectors(Wn, group_size, dim, rgs), _vectors(wts, group_size, dim, rgs), R, dim, group_size, rgs)
    return VQResult(weight=vq_lookup(table, codes, s, rgs), codes=codes, table=table, scale=s, row_groups=rgs)


def refine_tables(
    W: torch.Tensor, H: torch.Tensor, table: torch.Tensor, codes: torch.Tensor, iters: int, scale: torch.Tensor | None = None, row_groups: int = 1
) -> torch.Tensor:
    """Tables [G, K, d] (float64) lowering tr((W - Q(T)) H (W - Q(T))^T) with the codes (and
    row scales) fixed: ``iters`` conjugate-gradient steps on the normal equations
    P^T (P T H) = P^T (W H), where P T = Q reads each weight's codeword entry (times its row's
    scale) and P^T adds a [R, C] matrix (times the row scales) onto the entries."""
    G, K, d = table.shape
    R, C = W.shape
    tidx = table_index(R, C // d, G, row_groups, codes.device)
    idx = ((tidx * K + codes.long()) * d).unsqueeze(2) + torch.arange(d, device=codes.device)
    idx = idx.reshape(-1)  # flat entry of each weight, [R * C]
    sc = torch.ones(R, 1, dtype=torch.float64, device=W.device) if scale is None else scale.double().to(W.device).unsqueeze(1)
    Hd = H.double()
    P = lambda t: t[idx].reshape(R, C) * sc  # noqa: E731
    Pt = lambda m: torch.zeros(G * K * d, dtype=torch.float64, device=W.device).index_add_(0, idx, (m * sc).reshape(-1))  # noqa: E731
    x = table.double().reshape(-1).clone()
    r = Pt((W.double() - P(x)) @ Hd)
    p = r.clone()
    rr = float(r @ r)
    for _ in range(iters):
        if rr <= 0:
            break
        Ap = Pt(P(p) @ Hd)
        pap = float(p @ Ap)
        if pap <= 0:
            break
        a = rr / pap
        x += a * p
        r -= a * Ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x.reshape(G, K, d)


def _sweep(
    W: torch.Tensor, U: torch.Tensor, tabs: torch.Tensor, scale, dim: int, group_size: int, block_size: int, row_groups: int = 1
) -> torch.Tensor:
    """Codes [R, C / d] by the column sweep: at the first column of each vector, the d
    columns' current values go to the codeword nearest under || (v - s c) U_SS^-1 ||^2
    (each block of rows in its own table)."""
    R, C = W.shape
    gc, rows = C // group_size, R // row_groups
    codes = torch.empty(C // dim, R, dtype=torch.int64, device=W.device)
    chosen = torch.empty(R, dim, device=W.device)
    sf = None if scale is None else scale.float().to(W.device).unsqueeze(1)
    eye = torch.eye(dim, device=W.device)

    def target(blk: SweepBlock, i: int, w: torch.Tensor, q: torch.Tensor) -> None:
        j = blk.i1 + i
        t = j % dim
        if t == 0:
            A = torch.linalg.solve_triangular(blk.U1[i : i + dim, i : i + dim], eye, upper=True)
            v = blk.W1[i : i + dim].t()
            vn = (v if sf is None else v / sf) @ A  # s_o^2 scales a row's distances alike
            for r in range(row_groups):
                sl = slice(r * rows, (r + 1) * rows)
                tab = tabs[r * gc + j // group_size]
                code = assign(vn[sl], tab @ A)
                codes[j // dim, sl] = code
                chosen[sl] = tab[code] if sf is None else tab[code] * sf[sl]
        q.copy_(chosen[:, t])

    bs = max(dim, block_size // dim * dim)  # a vector never straddles two blocks
    column_sweep(W.clone().t().contiguous(), U, bs, target)
    return codes.t().contiguous()


def vq_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    dim: int,
    bits: int,
    *,
    group_size: int | None,
    row_scale: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    kmeans_iters: int = 25,
    refine_iters: int = 10,
    seed: int = 0,
    table: torch.Tensor | None = None,
    name: str | None = None,
    row_group_size: int | None = None,
    em_rounds: int = 1,
    table_bits: int = TABLE_BITS,
) -> VQResult:
    """GPTVQ: H-diagonal k-means tables (or ``table`` given), codes by the column sweep with
    error feedback, then ``refine_iters`` least-squares steps on the tables; ``em_rounds`` > 1
    repeats sweep and refinement on the refined tables (each round's codes are the best under
    its tables, each round's tables the best for its codes; the lower-error round is kept, so
    more rounds never raise the layer error). ``table_bits=8``: tables of int8 entries and a
    float16 scale each, rounded so before every assignment. ``row_scale``:
    each row is divided by its float16 RMS before the tables are fitted and multiplied back
    after lookup (one more float16 per row). ``row_group_size``: rows sharing one table per
    column group (None: all rows)."""
    validate_solver_fields(block_size, damp)
    check_table_bits(table_bits)
    R, C = weight.shape
    check_vq_shape(R, C, dim, bits, group_size, f"layer {name}: " if name else "", row_group_size=row_group_size)
    compact = table_bits != TABLE_BITS
    rounded = (lambda t: quantize_tables(t)[2]) if compact else (lambda t: t.half())  # noqa: E731
    group_size = C if group_size is None else group_size
    rgs = R // (R if row_group_size is None else row_group_size)
    with solver_threads(weight.device):
        W, H, _ = prepare(weight, hessian, name)
        Wn, wts, s = _normalized(W, torch.diagonal(H), row_scale)
        if table is None:
            table = init_tables(Wn, wts, dim, bits, group_size, iters=kmeans_iters, seed=seed, row_groups=rgs)
        table = rounded(table)
        del Wn, wts
        fac = inverse_cholesky(H, damp, name)
        best = None
        for _ in range(max(1, em_rounds)):
            codes = _sweep(W, fac.U, table.float(), s, dim, group_size, block_size, rgs)
            if refine_iters > 0:
                table = rounded(refine_tables(W, H, table, codes, refine_iters, s, rgs))
            Q = vq_lookup(table, codes, s, rgs)
            D = (W - Q).double()
            loss = float(((D @ H.double()) * D).sum())
            if best is None or loss < best[0]:
                best = (loss, Q, codes, table)
            del D
        loss, Q, codes, table = best
    tq, ts = quantize_tables(table)[:2] if compact else (None, None)  # exact: the table is already on its grid
    return VQResult(weight=Q, codes=codes, table=table, scale=s, loss=loss, damp=fac.damp, row_groups=rgs, table_q=tq, table_scale=ts)
