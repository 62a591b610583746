"""Weighted 1-D k-means (quant/kmeans.py): the seeds' example, optimality against brute force,
weights, float16 tables, refusals."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmpress.errors import UserError
from llmpress.quant.kmeans import (
    check_bits,
    fp16_codebook,
    kmeans_1d,
    kmeans_1d_exact,
    kmeans_1d_lloyd,
    minmax_grid_1d,
    nearest,
    weighted_error,
)

SEEDS_X = torch.tensor([[10.4, 1.2, 8.7, 0.6, 9.9, 2.2, 1.8, 12.0]])


@pytest.mark.parametrize("solver", [kmeans_1d, kmeans_1d_exact, kmeans_1d_lloyd])
def test_the_seeds_clustering_example(solver):
    c, codes = solver(SEEDS_X, 2)
    assert torch.allclose(c, torch.tensor([[1.45, 10.25]]), atol=1e-6)
    assert codes.tolist() == [[1, 0, 1, 0, 1, 0, 0, 1]]
    mae = (SEEDS_X - c.gather(1, codes)).abs().mean()
    assert float(mae) == pytest.approx(0.75, abs=1e-6)
    grid, gcodes = minmax_grid_1d(SEEDS_X, 1)
    assert torch.allclose(grid, torch.tensor([[0.6, 12.0]]))
    assert float((SEEDS_X - grid.gather(1, gcodes)).abs().mean()) == pytest.approx(1.3, abs=1e-6)


def _brute_force(x: torch.Tensor, k: int, w: torch.Tensor) -> float:
    """The least weighted squared error over every assignment of the values to k clusters."""
    best = float("inf")
    xd, wd = x.double(), w.double()
    for assign in itertools.product(range(k), repeat=x.numel()):
        a = torch.tensor(assign)
        err = 0.0
        for j in range(k):
            m = a == j
            if m.any() and wd[m].sum() > 0:
                mu = (wd[m] * xd[m]).sum() / wd[m].sum()
                err += float((wd[m] * (xd[m] - mu) ** 2).sum())
        best = min(best, err)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_exact_dp_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 7, 3
    x = torch.randn(2, n, generator=g)
    w = torch.rand(2, n, generator=g) + 0.05
    for r in range(2):
        best = _brute_force(x[r], k, w[r])
        for solver in (kmeans_1d_exact, kmeans_1d):  # a row of 7 values: the default is exact too
            c, codes = solver(x, k, w)
            assert float(weighted_error(x, c, codes, w)[r]) == pytest.approx(best, rel=1e-5, abs=1e-9)
        c, codes = kmeans_1d_lloyd(x, k, w)
        assert float(weighted_error(x, c, codes, w)[r]) >= best * (1 - 1e-5)


def test_binned_dp_then_lloyd_near_the_optimum_and_quantile_lloyd_worse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 200, generator=g)
    w = torch.rand(32, 200, generator=g)
    for k in (4, 8):
        exact = weighted_error(x, *kmeans_1d_exact(x, k, w), w)
        binned = weighted_error(x, *kmeans_1d(x, k, w, bins=40), w)
        lloyd = weighted_error(x, *kmeans_1d_lloyd(x, k, w), w)
        assert bool((binned >= exact * (1 - 1e-6)).all()) and bool((lloyd >= exact * (1 - 1e-6)).all())
        assert float(binned.sum() / exact.sum()) < 1.01  # within 1% of the optimum in total
        assert float(lloyd.sum()) > float(binned.sum())


def test_windowed_programme_exact_over_full_windows_and_never_worse_than_its_start():
    from llmpress.quant.kmeans import _dp_rows, _means, _prefix, _prepare, _windowed_dp

    g = torch.Generator().manual_seed(1)
    x, w, k = torch.randn(8, 60, generator=g), torch.rand(8, 60, generator=g), 5
    xs, ws, _ = _prepare(x, k, w, "")
    R, n = xs.shape
    cw, cwx, cwxx = _prefix(ws), _prefix(ws * xs), _prefix(ws * xs * xs)

    def err(b):  # the within-run weighted squared error of the runs ``b``
        c = _means(xs, cw, cwx, b)
        out = torch.zeros(R, dtype=torch.float64)
        for j in range(k):
            m = (torch.arange(n) >= b[:, j : j + 1]) & (torch.arange(n) < b[:, j + 1 : j + 2])
            out += (m * ws * (xs - c[:, j : j + 1]) ** 2).sum(1)
        return out

    every = torch.arange(n + 1).expand(R, k - 1, n + 1)  # each boundary free over every value
    exact = _dp_rows(xs, cw, cwx, cwxx, torch.arange(n + 1).expand(R, n + 1), k)
    assert torch.allclose(err(_windowed_dp(cw, cwx, cwxx, every, n)), err(exact), rtol=1e-9)
    coarse = _dp_rows(xs, cw, cwx, cwxx, torch.arange(0, n + 1, 10).expand(R, -1), k)  # runs of 10 values
    win = (coarse[:, 1:-1].unsqueeze(2) + torch.arange(-3, 4)).clamp_(0, n)
    moved = _windowed_dp(cw, cwx, cwxx, win, n)
    assert bool((err(moved) <= err(coarse) + 1e-12).all()) and float(err(moved).sum()) < float(err(coarse).sum())
    assert bool(((moved[:, 1:-1] - coarse[:, 1:-1]).abs() <= 3).all())  # each boundary stayed in its window


def test_weights_pull_the_centroids():
    x = torch.tensor([[0.0, 1.0, 10.0, 11.0]])
    heavy = torch.tensor([[1.0, 9.0, 1.0, 1.0]])
    for solver in (kmeans_1d, kmeans_1d_exact, kmeans_1d_lloyd):
        c, codes = solver(x, 2, heavy)
        assert torch.allclose(c, torch.tensor([[0.9, 10.5]]), atol=1e-6)
        assert codes.tolist() == [[0, 0, 1, 1]]
    # a zero weight does not move its centroid; an all-zero row is clustered with equal weights
    c, _ = kmeans_1d_exact(torch.tensor([[0.0, 1.0, 10.0, 50.0]]), 2, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(c, torch.tensor([[0.5, 10.0]]))
    c0, _ = kmeans_1d(x, 2, torch.zeros(1, 4))
    assert torch.allclose(c0, torch.tensor([[0.5, 10.5]]))


def test_fp16_table_and_nearest_codes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 32, generator=g) * 0.02
    c, _ = kmeans_1d(x, 8)
    t16, codes = fp16_codebook(x, c)
    assert t16.dtype == torch.float16 and bool((t16[:, 1:] >= t16[:, :-1]).all())
    q = t16.float().gather(1, codes)
    # every value sits at its nearest float16 entry
    assert bool(((x - q).abs() <= (x.unsqueeze(2) - t16.float().unsqueeze(1)).abs().min(2).values + 1e-9).all())
    assert nearest(torch.tensor([[0.5, 0.49, 0.51]]), torch.tensor([[0.0, 1.0]])).tolist() == [[0, 0, 1]]


def test_refusals():
    with pytest.raises(UserError, match="4 centroids for rows of 3 weights"):
        kmeans_1d(torch.randn(2, 3), 4)
    with pytest.raises(UserError, match="4 centroids for rows of 3 weights"):
        kmeans_1d_exact(torch.randn(2, 3), 4)
    for bad in (0, 9, 2.5, True):
        with pytest.raises(UserError, match="1 to 8 bits"):
            check_bits(bad)
    with pytest.raises(UserError, match="non-negative"):
        kmeans_1d(torch.randn(2, 8), 2, -torch.ones(2, 8))
