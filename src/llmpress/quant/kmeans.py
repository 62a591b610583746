"""Weighted 1-D k-means: a learned codebook of K = 2^b values per row (or per group of
columns) instead of a uniform grid (SqueezeLLM's non-uniform quantization).

For a row x_1..x_n with sensitivities s_1..s_n >= 0 the codebook c_1 <= ... <= c_K minimizes

    sum_i s_i (x_i - c_{a(i)})^2,    a(i) = argmin_k |x_i - c_k|

In one dimension the clusters of an optimum are contiguous runs of the sorted values, and
with prefix sums of s, s x and s x^2 over the sorted row the cost of any run is O(1). So

- :func:`kmeans_1d` (the default) first solves the problem exactly over partitions whose run
  boundaries fall on ``bins`` (128) equal-count runs of the sorted row, by dynamic programming
  D_j(i) = min_l D_{j-1}(l) + cost(l, i) (O(K B^2) per row, every row of a layer at once in
  [rows, B + 1, B + 1] slices), then moves each boundary to its best place among the values
  within two runs of it (the same programme, boundary j only in its own window: O(K m^2) per
  row for windows of m values; repeated, centred on the new boundaries, at most 4 times), then
  polishes with Lloyd's iterations on the values: the cluster
  of c_k is the run between the midpoints (c_{k-1} + c_k)/2 and (c_k + c_{k+1})/2
  (``searchsorted``), its new centroid the weighted mean of the run, read off the prefix sums.
  A row of at most ``bins`` values gets the exact optimum. The DP start keeps Lloyd out of
  the poor local optima that a quantile start falls into (10% above the optimum in total on
  48-value Gaussian rows with random weights; see tests/quant/test_kmeans.py);
- :func:`kmeans_1d_exact`: the same programme over every value (O(K n^2) per row): the
  reference;
- :func:`kmeans_1d_lloyd`: Lloyd's iterations alone from the weighted quantiles (k + 1/2)/K.

A row with every sensitivity zero is clustered with equal weights. The codebooks are handed
on in float16 (:func:`fp16_codebook`: rounded, then each weight re-assigned to its nearest
float16 entry), the form they are stored in.
"""

from __future__ import annotations

import torch

from ..errors import UserError

MAX_BITS = 8  # 256-entry tables
DEFAULT_ITERS = 100
DEFAULT_BINS = 128  # dynamic programme over at most this many runs of each sorted row
REFINE_ROUNDS = 4  # windowed programmes, each centred on the last one's boundaries (fewer once they stay put)
REFINE_REACH = 2  # each boundary searched within this many of the first programme's runs either side
DP_CHUNK = 1 << 22  # rows per DP slice: about this many float64 per [rows, B + 1, B + 1] temporary


def check_bits(bits) -> int:
    """K = 2^bits for bits in [1, MAX_BITS], or a UserError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise UserError(f"bits={bits!r}: codebook quantization takes 1 to {MAX_BITS} bits (2 to {2**MAX_BITS} centroids)")
    return 1 << bits


def _prepare(x: torch.Tensor, k: int, weights: torch.Tensor | None, where: str):
    """Sorted rows, their weights (float64) and the sort order; checks k against the row length."""
    if x.dim() != 2:
        raise UserError(f"{where}k-means takes rows [R, n], got shape {tuple(x.shape)}")
    n = x.shape[1]
    if k > n:
        raise UserError(
            f"{where}{k} centroids for rows of {n} weights: a row needs at least as many weights as centroids (fewer bits or a larger group)"
        )
    xs, order = x.double().sort(dim=1, stable=True)
    if weights is None:
        ws = torch.ones_like(xs)
    else:
        if weights.shape != x.shape:
            raise UserError(f"{where}weights of shape {tuple(weights.shape)} for values of shape {tuple(x.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise UserError(f"{where}k-means weights must be finite and non-negative")
        ws = weights.double().gather(1, order)
        dead = ws.sum(1, keepdim=True) == 0
        ws = torch.where(dead, torch.ones_like(ws), ws)
    return xs, ws, order


def _prefix(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(t.cumsum(1), (1, 0))


def _init(xs: torch.Tensor, cw: torch.Tensor, k: int) -> torch.Tensor:
    """The weighted quantiles (j + 1/2) / k of each sorted row."""
    total = cw[:, -1:]
    q = (torch.arange(k, dtype=xs.dtype, device=xs.device) + 0.5) / k * total
    idx = torch.searchsorted(cw[:, 1:].contiguous(), q.contiguous()).clamp_(max=xs.shape[1] - 1)
    return xs.gather(1, idx)


def _runs(xs: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[R, k + 1] boundaries of the runs of sorted ``xs`` nearest each of the sorted centroids ``c``."""
    mid = (c[:, :-1] + c[:, 1:]) / 2
    cut = torch.searchsorted(xs, mid.contiguous())  # values < mid go left (a tie goes to the lower centroid)
    R, n = xs.shape
    lo = torch.zeros(R, 1, dtype=cut.dtype, device=xs.device)
    return torch.cat([lo, cut, torch.full_like(lo, n)], dim=1)


def _lloyd(xs: torch.Tensor, cw: torch.Tensor, cwx: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd's iterations from ``c`` on sorted rows (prefix sums ``cw``, ``cwx``); a centroid
    whose run is empty stays where it is."""
    for _ in range(max(0, iters)):
        b = _runs(xs, c)
        wsum = cw.gather(1, b[:, 1:]) - cw.gather(1, b[:, :-1])
        xsum = cwx.gather(1, b[:, 1:]) - cwx.gather(1, b[:, :-1])
        new = torch.where(wsum > 0, xsum / wsum.clamp(min=torch.finfo(xs.dtype).tiny), c).sort(dim=1).values
        if torch.equal(new, c):
            break
        c = new
    return c


def _dp(xs: torch.Tensor, cw: torch.Tensor, cwx: torch.Tensor, cwxx: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """Run boundaries [R, k + 1] (sorted indices) of the optimal partition of each sorted row
    into k runs whose boundaries lie in ``pos`` [R, P] (ascending per row, from 0 to n; a
    repeated position allows an empty run): dynamic programming
    D_j(i) = min_l D_{j-1}(l) + cost(l, i) over those boundaries."""
    R, P = pos.shape
    w, s, q = (t.gather(1, pos) for t in (cw, cwx, cwxx))
    W = w.unsqueeze(1) - w.unsqueeze(2)  # [R, l, i]: the run pos[l]..pos[i]-1
    S = s.unsqueeze(1) - s.unsqueeze(2)
    cost = (q.unsqueeze(1) - q.unsqueeze(2) - S * S / W.clamp(min=1e-300)).clamp_(min=0)
    del W, S
    ar = torch.arange(P, device=xs.device)
    cost.masked_fill_((ar.unsqueeze(1) >= ar.unsqueeze(0)).unsqueeze(0), float("inf"))
    D = cost[:, 0, :]
    back = []
    for _ in range(1, k):
        D, arg = (D.unsqueeze(2) + cost).min(dim=1)
        back.append(arg)
    bounds = [torch.full((R,), P - 1, dtype=torch.int64, device=xs.device)]
    for arg in reversed(back):
        bounds.append(arg.gather(1, bounds[-1].unsqueeze(1)).squeeze(1))
    bounds.append(torch.zeros(R, dtype=torch.int64, device=xs.device))
    return pos.gather(1, torch.stack(bounds[::-1], dim=1))


def _means(xs, cw, cwx, b: torch.Tensor) -> torch.Tensor:
    """Weighted mean of each run [b_j, b_{j+1}) (a run of zero weight: its first value)."""
    wsum = cw.gather(1, b[:, 1:]) - cw.gather(1, b[:, :-1])
    xsum = cwx.gather(1, b[:, 1:]) - cwx.gather(1, b[:, :-1])
    first = xs.gather(1, b[:, :-1].clamp(max=xs.shape[1] - 1))
    return torch.where(wsum > 0, xsum / wsum.clamp(min=1e-300), first)


def _dp_rows(xs, cw, cwx, cwxx, pos: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`_dp` over slices of rows (each [rows, P, P] temporary about ``DP_CHUNK`` numbers)."""
    step = max(1, DP_CHUNK // (pos.shape[1] ** 2))
    sl = lambda t, i: t[i : i + step]  # noqa: E731
    return torch.cat([_dp(sl(xs, i), sl(cw, i), sl(cwx, i), sl(cwxx, i), sl(pos, i), k) for i in range(0, xs.shape[0], step)])


def kmeans_1d(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    *,
    bins: int | None = DEFAULT_BINS,
    iters: int = DEFAULT_ITERS,
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means of every row of ``x`` [R, n].

    The optimal partition whose run boundaries fall on ``bins`` equal-count runs of the
    sorted row (dynamic programming; every value its own run when n <= ``bins`` or ``bins``
    is None: then the result is the exact optimum), each boundary then moved to its best place
    among the values within ``REFINE_REACH`` runs of it (:func:`_windowed_dp`, up to
    ``REFINE_ROUNDS`` times), then Lloyd's iterations on the values from there
    (``iters``; they only lower the error).
    Returns (centroids [R, k] float32 ascending, codes [R, n] int64: each value's nearest centroid)."""
    xs, ws, _ = _prepare(x, k, weights, where)
    R, n = xs.shape
    cw, cwx, cwxx = _prefix(ws), _prefix(ws * xs), _prefix(ws * xs * xs)
    if bins is None or n <= bins:
        pos = torch.arange(n + 1, device=xs.device).expand(R, n + 1)
        return _done(x, _means(xs, cw, cwx, _dp_rows(xs, cw, cwx, cwxx, pos, k)))
    B = max(bins, k)
    pos = torch.linspace(0, n, B + 1, dtype=torch.float64, device=xs.device).round().long().unique().expand(R, -1)
    b = _dp_rows(xs, cw, cwx, cwxx, pos, k)
    # again over every value within REFINE_REACH runs of each boundary found, boundary j in its own window
    h = REFINE_REACH * -(-n // B)
    for _ in range(REFINE_ROUNDS):
        win = (b[:, 1:-1].unsqueeze(2) + torch.arange(-h, h + 1, device=xs.device)).clamp_(0, n)
        b, old = _windowed_dp(cw, cwx, cwxx, win, n), b
        if torch.equal(b, old):
            break
    return _done(x, _lloyd(xs, cw, cwx, _means(xs, cw, cwx, b), iters))


def _windowed_dp(cw: torch.Tensor, cwx: torch.Tensor, cwxx: torch.Tensor, win: torch.Tensor, n: int) -> torch.Tensor:
    """Run boundaries [R, k + 1] of the best partition of each sorted row whose inner boundary j
    lies in ``win[:, j - 1]`` [R, k - 1, m] (ascending positions): the programme
    D_j(i) = min_l D_{j-1}(l) + cost(l, i) with l over window j - 1 and i over window j only,
    O(k m^2) per row instead of O(k (k m)^2) over the union of the windows."""
    R, k1, m = win.shape
    dev = cw.device

    def cost(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # [R, a], [R, b] -> [R, a, b]; inf where lo > hi
        w = cw.gather(1, hi).unsqueeze(1) - cw.gather(1, lo).unsqueeze(2)
        s = cwx.gather(1, hi).unsqueeze(1) - cwx.gather(1, lo).unsqueeze(2)
        q = cwxx.gather(1, hi).unsqueeze(1) - cwxx.gather(1, lo).unsqueeze(2)
        c = (q - s * s / w.clamp(min=1e-300)).clamp_(min=0)
        return c.masked_fill_(lo.unsqueeze(2) > hi.unsqueeze(1), float("inf"))

    zero, end = torch.zeros(R, 1, dtype=torch.int64, device=dev), torch.full((R, 1), n, dtype=torch.int64, device=dev)
    stops = [zero] + [win[:, j] for j in range(k1)] + [end]
    D = torch.zeros(R, 1, dtype=cw.dtype, device=dev)
    back = []
    for j in range(1, len(stops)):
        D, arg = (D.unsqueeze(2) + cost(stops[j - 1], stops[j])).min(dim=1)
        back.append(arg)
    idx = torch.zeros(R, 1, dtype=torch.int64, device=dev)
    bounds = [end]
    for j in range(len(stops) - 1, 0, -1):
        idx = back[j - 1].gather(1, idx)
        bounds.append(stops[j - 1].gather(1, idx))
    return torch.cat(bounds[::-1], dim=1)


def _done(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = c.float().sort(dim=1).values
    return c, nearest(x, c)


def kmeans_1d_exact(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, *, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal weighted k-means of every row (the dynamic programme over every sorted
    value: O(k n^2) per row; for small rows and as the reference)."""
    return kmeans_1d(x, k, weights, bins=None, where=where)


def kmeans_1d_lloyd(
    x: torch.Tensor, k: int, weights: torch.Tensor | None = None, *, iters: int = DEFAULT_ITERS, where: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations alone from the weighted quantiles (k + 1/2)/k: fastest, a local optimum."""
    xs, ws, _ = _prepare(x, k, weights, where)
    cw, cwx = _prefix(ws), _prefix(ws * xs)
    c = _lloyd(xs, cw, cwx, _init(xs, cw, k), iters).float()
    return c, nearest(x, c)


def nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Code of the nearest entry of each row's ascending ``table`` [R, k] for ``x`` [R, n]
    (a value halfway between two entries takes the lower)."""
    t = table.to(x.dtype)
    mid = (t[:, :-1] + t[:, 1:]) / 2
    return torch.searchsorted(mid.contiguous(), x.contiguous())


def weighted_error(x: torch.Tensor, table: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per row: sum_i s_i (x_i - table[codes_i])^2 (float64)."""
    d = (x.double() - table.double().gather(1, codes)).pow(2)
    return (d if weights is None else d * weights.double()).sum(1)


def fp16_codebook(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The table rounded to float16 (ascending) and each value's nearest float16 entry:
    (table float16 [R, k], codes [R, n] int64)."""
    t16 = table.half().sort(dim=1).values
    return t16, nearest(x.float(), t16.float())


def minmax_grid_1d(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform asymmetric min-max grid of each row (2^bits levels from min to max) as a
    table, with nearest codes: the baseline a learned codebook is compared against."""
    k = check_bits(bits)
    lo, hi = x.float().min(1, keepdim=True).values, x.float().max(1, keepdim=True).values
    table = lo + (hi - lo) * torch.arange(k, dtype=torch.float32, device=x.device) / (k - 1)
    return table, nearest(x.float(), table)
