"""The OBS/OBQ reference (exact one-weight-at-a-time): the oracle of GPTQ and SparseGPT."""

import pytest
import torch
from obs_problems import correlated_problem, damped, output_error

from llmpress.prune.masks import magnitude_prune
from llmpress.quant import QuantArgs, quantize, quantize_weight
from llmpress.quant.hessian import inverse_cholesky, layer_error
from llmpress.quant.obs import obq_quantize, obs_fixed_mask, obs_prune, optimal_reconstruction


def test_obs_prune_exact_count_per_row_and_optimal_for_its_mask():
    W, X, H = correlated_problem(rows=6, cols=12, seed=1)
    Hd = damped(H)
    P, loss = obs_prune(W, Hd, 0.5)
    assert ((P == 0).sum(1) == 6).all()
    # successive exact eliminations = the least-squares optimum for the final mask
    best = optimal_reconstruction(W, Hd, P == 0)
    assert torch.allclose(P, best, atol=1e-4)
    # the summed OBS increments are the exact error (with the damped Hessian it used)
    assert layer_error(W, P, Hd) == pytest.approx(2 * loss, rel=1e-6)


def test_obs_prune_beats_magnitude_on_correlated_inputs():
    for seed in range(3):
        W, X, H = correlated_problem(rows=8, cols=16, seed=seed)
        P, _ = obs_prune(W, damped(H), 0.5)
        M = magnitude_prune(W, 0.5)
        assert output_error(W, P, X) < 0.5 * output_error(W, M, X)


def test_single_weight_obs_update_is_the_closed_form():
    # removing one weight: delta = -w_q / [H^-1]_qq * H^-1[:, q], cost w_q^2 / (2 [H^-1]_qq)
    W, X, H = correlated_problem(rows=1, cols=5, seed=2)
    Hd = damped(H).double()
    Hinv = torch.linalg.inv(Hd)
    scores = W[0].double() ** 2 / Hinv.diagonal()
    q = int(scores.argmin())
    expect = W[0].double() - W[0, q].double() / Hinv[q, q] * Hinv[:, q]
    P, loss = obs_prune(W, Hd, 1 / 5)
    assert torch.allclose(P[0].double(), expect, atol=1e-5)
    assert P[0, q] == 0
    assert loss == pytest.approx(float(scores[q] / 2), rel=1e-6)


@pytest.mark.parametrize("args", [QuantArgs(bits=3, granularity="channel"), QuantArgs(bits=4, group_size=4, symmetric=False)])
def test_obq_quantizes_onto_the_grid_and_beats_rtn(args):
    W, X, H = correlated_problem(rows=6, cols=16, seed=3)
    Hd = damped(H)
    Q, qp, loss = obq_quantize(W, Hd, args)
    codes = quantize(Q, qp, args)
    assert torch.equal(codes, torch.round(codes))
    assert layer_error(W, Q, Hd) == pytest.approx(2 * loss, rel=1e-5)
    rtn, _ = quantize_weight(W, args)
    assert output_error(W, Q, X) < output_error(W, rtn, X)


def test_obs_fixed_mask_is_a_valid_but_not_optimal_reconstruction():
    W, X, H = correlated_problem(rows=4, cols=10, seed=4)
    Hd = damped(H)
    mask = magnitude_prune(W, 0.5) == 0
    seq = obs_fixed_mask(W, Hd, mask)
    best = optimal_reconstruction(W, Hd, mask)
    assert (seq[mask] == 0).all()
    assert layer_error(W, best, Hd) <= layer_error(W, seq, Hd) + 1e-6
    assert layer_error(W, seq, Hd) < layer_error(W, W.masked_fill(mask, 0), Hd)


def test_cholesky_rows_are_the_eliminated_inverse_rows():
    # row i of U (upper Cholesky of H^-1), times U_ii, is row i of the inverse Hessian after
    # eliminating columns 0..i-1: the identity GPTQ's reformulation rests on
    W, X, H = correlated_problem(rows=1, cols=7, seed=5)
    Hd = damped(H).double()
    U = inverse_cholesky(Hd.float(), 0.0).U.double()
    Hinv = torch.linalg.inv(Hd)
    for i in range(7):
        assert torch.allclose(U[i, i:] * U[i, i], Hinv[i, i:], rtol=1e-3, atol=1e-6)
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
