"""SparseGPT and the mask helpers: exact patterns, error against magnitude, the OBS oracle, engine."""

import logging

import pytest
import torch
import torch.nn as nn
from conftest import random_windows, tiny_llama
from obs_problems import correlated_problem, damped, output_error

from llmpress import RecipeError, UserError, compress, stage
from llmpress.prune.masks import is_nm, magnitude_prune, nm_prune_mask, row_prune_mask, sparsity_of, topk_prune_mask
from llmpress.prune.sparsegpt import SparseGPT, sparsegpt, sparsegpt_prune
from llmpress.quant import QuantArgs, quantize, quantize_weight
from llmpress.quant.hessian import layer_error
from llmpress.quant.obs import obs_fixed_mask, optimal_reconstruction
from llmpress.registry import ModuleContext, ModuleRecord

W4G8 = QuantArgs(bits=4, group_size=8)


# --- mask helpers -----------------------------------------------------------------------


def test_nm_mask_keeps_the_n_largest_of_each_run():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.4, 0.3]])
    assert nm_prune_mask(s, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    s = torch.rand(7, 32)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        mask = nm_prune_mask(s, n, m)
        assert (mask.reshape(7, -1, m).sum(-1) == m - n).all()
    with pytest.raises(UserError, match="multiple of m"):
        nm_prune_mask(torch.rand(2, 6), 2, 4)


def test_topk_and_row_masks_hit_exact_counts():
    s = torch.rand(5, 13)
    assert int(topk_prune_mask(s, 29).sum()) == 29
    assert (row_prune_mask(s, 0.3).sum(1) == round(0.3 * 13)).all()
    assert sparsity_of(magnitude_prune(s, 0.5)) == pytest.approx(5 * round(6.5) / 65)
    assert is_nm(magnitude_prune(s[:, :12], n=2, m=4), 2, 4)


# --- the solver -------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity,rows,cols,bs", [(0.5, 16, 32, 8), (0.3, 7, 24, 16), (0.7, 9, 40, 128), (0.5, 5, 37, 10)])
def test_unstructured_hits_the_exact_overall_sparsity(sparsity, rows, cols, bs):
    W, X, H = correlated_problem(rows=rows, cols=cols, seed=1)
    res = sparsegpt_prune(W, H, sparsity, block_size=bs)
    assert int(res.mask.sum()) == round(sparsity * rows * cols)
    assert (res.weight[res.mask] == 0).all()
    assert res.sparsity == pytest.approx(round(sparsity * rows * cols) / (rows * cols))


@pytest.mark.parametrize("bs", [8, 16, 128])
def test_per_row_masks_prune_every_row_equally_and_stay_obs_exact(bs):
    W, X, H = correlated_problem(rows=12, cols=32, seed=5)
    res = sparsegpt_prune(W, H, 0.5, block_size=bs, per_row=True)
    assert (res.mask.sum(1) == 16).all()  # each row: half of its inputs
    for i1 in range(0, 32, bs):  # and half of each block's share
        assert (res.mask[:, i1 : i1 + bs].sum(1) == min(bs, 32 - i1) // 2).all()
    assert torch.allclose(res.weight, obs_fixed_mask(W, damped(H), res.mask), atol=1e-5)
    block = sparsegpt_prune(W, H, 0.5, block_size=bs)
    assert not (block.mask.sum(1) == 16).all()  # the paper's block-wide choice is uneven per row


@pytest.mark.parametrize("per_row", [False, True])
def test_act_order_sweep_is_obs_exact_in_the_original_column_order(per_row):
    W, X, H = correlated_problem(rows=10, cols=24, seed=6)
    res = sparsegpt_prune(W, H, 0.5, block_size=8, per_row=per_row, act_order=True)
    assert int(res.mask.sum()) == 120 and (res.weight[res.mask] == 0).all()
    # the compensation is the OBS solution for that mask taken in the same (permuted) order
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    ref = obs_fixed_mask(W[:, perm], damped(H)[perm][:, perm], res.mask[:, perm])
    assert torch.allclose(res.weight[:, perm], ref, atol=1e-5)
    q = sparsegpt_prune(W, H, 0.5, block_size=8, act_order=True, weights=W4G8)
    assert (q.weight[q.mask] == 0).all() and sparsity_of(q.weight) >= 0.5
    with pytest.raises(RecipeError, match="act_order"):
        SparseGPT(n=2, m=4, act_order=True)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_pattern_is_exact(n, m):
    W, X, H = correlated_problem(rows=12, cols=32, seed=2)
    res = sparsegpt_prune(W, H, n=n, m=m, block_size=10)  # rounded down to a multiple of m
    assert is_nm(res.weight, n, m)
    assert (res.mask.reshape(12, -1, m).sum(-1) == m - n).all()
    assert res.sparsity == pytest.approx(1 - n / m)


def test_matches_the_sequential_obs_oracle_for_its_mask():
    W, X, H = correlated_problem(rows=10, cols=24, seed=3)
    for kw in ({"sparsity": 0.5, "block_size": 8}, {"n": 2, "m": 4, "block_size": 8}):
        res = sparsegpt_prune(W, H, **kw)
        ref = obs_fixed_mask(W, damped(H), res.mask)
        assert torch.allclose(res.weight, ref, atol=1e-5)
        # and no method using this mask can do better than least squares
        best = optimal_reconstruction(W, damped(H), res.mask)
        assert layer_error(W, best, H) <= layer_error(W, res.weight, H) * (1 + 1e-6)
        assert layer_error(W, res.weight, damped(H)) == pytest.approx(2 * res.loss, rel=1e-3)


def test_nm_result_does_not_depend_on_the_block_size():
    # N:M masks are chosen per run of m columns on the current weights; lazy batches are exact
    W, X, H = correlated_problem(rows=6, cols=32, seed=4)
    ref = sparsegpt_prune(W, H, n=2, m=4, block_size=32)
    for bs in (4, 8, 12, 128):
        assert torch.allclose(sparsegpt_prune(W, H, n=2, m=4, block_size=bs).weight, ref.weight, atol=1e-5)


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n": 2, "m": 4}, {"n": 4, "m": 8}, {"sparsity": 0.7}])
def test_beats_magnitude_pruning_on_correlated_inputs(pattern):
    for seed in range(4):
        W, X, H = correlated_problem(rows=32, cols=64, seed=seed)
        res = sparsegpt_prune(W, H, block_size=32, **pattern)
        mag = magnitude_prune(W, **pattern)
        assert output_error(W, res.weight, X) < 0.8 * output_error(W, mag, X), seed


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize(
    "args",
    [W4G8, QuantArgs(bits=3, group_size=8, symmetric=False), QuantArgs(bits=4, granularity="channel"), QuantArgs(kind="ternary", group_size=8)],
    ids=lambda a: a.describe(),
)
def test_joint_sparsity_and_quantization(args, static):
    W, X, H = correlated_problem(rows=12, cols=32, seed=5)
    res = sparsegpt_prune(W, H, 0.5, block_size=16, weights=args, static_groups=static)
    assert (res.weight[res.mask] == 0).all()
    assert res.sparsity >= 0.5  # small kept weights may also round to 0
    codes = quantize(res.weight, res.qparams, args)
    assert torch.equal(codes, torch.round(codes))
    assert codes.min() >= args.qmin and codes.max() <= args.qmax
    # one pass beats pruning by magnitude then rounding
    base, _ = quantize_weight(magnitude_prune(W, 0.5), args)
    assert output_error(W, res.weight, X) < output_error(W, base, X)


def test_joint_nm_and_quantization_keeps_the_pattern():
    W, X, H = correlated_problem(rows=8, cols=32, seed=6)
    res = sparsegpt_prune(W, H, n=2, m=4, block_size=16, weights=W4G8)
    assert is_nm(res.weight, 2, 4)
    codes = quantize(res.weight, res.qparams, W4G8)
    assert torch.equal(codes, torch.round(codes))


def test_dead_inputs_and_dampening_retry():
    W, X, H = correlated_problem(rows=6, cols=16, n=6, seed=7)  # rank 6 < 16
    X[:, 5] = 0
    H = 2.0 / X.shape[0] * X.T @ X
    res = sparsegpt_prune(W, H, 0.5, damp=0.0)
    assert res.dead == 1 and res.damp_retries >= 1 and res.damp > 0
    assert torch.isfinite(res.weight).all()
    assert int(res.mask.sum()) == 48
    # the dead column is scored as an average input, not dropped for free: some of it is kept
    assert (res.weight[:, 5] != 0).any()
    pruned = res.mask[:, 5]
    assert (res.weight[:, 5][pruned] == 0).all() and (res.weight[:, 5][~pruned] == W[:, 5][~pruned]).all()


def test_handler_records_sparsity_pattern_and_damping(caplog):
    lin = nn.Linear(16, 6, bias=False)
    W, X, H = correlated_problem(rows=6, cols=16, n=6, seed=7)
    lin.weight.data.copy_(W)
    rec = ModuleRecord(name="x.proj", out_features=6, in_features=16)
    with caplog.at_level(logging.WARNING):
        sparsegpt(ModuleContext(name="x.proj", module=lin, stats={"hessian": H}, record=rec), SparseGPT(n=2, m=4, damp=0.0, weights=W4G8))
    assert rec.notes["pattern"] == "2:4"
    assert rec.sparsity == pytest.approx(sparsity_of(lin.weight.data)) and rec.sparsity >= 0.5
    assert rec.notes["damp_retries"] >= 1 and "retr" in caplog.text
    assert rec.weight_args == W4G8 and rec.qparams.scale.shape == (6, 2)


def test_config_validation_names_the_field():
    with pytest.raises(RecipeError, match="sparsity"):
        stage("sparsegpt", sparsity=1.5)
    with pytest.raises(RecipeError, match="n=3, m=0"):
        stage("sparsegpt", n=3)
    with pytest.raises(RecipeError, match="0 < n < m"):
        stage("sparsegpt", n=4, m=4)
    with pytest.raises(RecipeError, match="binary"):
        stage("sparsegpt", weights=QuantArgs(kind="binary"))
    with pytest.raises(UserError, match="multiple of 4"):
        sparsegpt_prune(torch.randn(3, 10), torch.eye(10), n=2, m=4)


@pytest.mark.parametrize(
    "preset,check",
    [
        ("sparsegpt-50", lambda w: sparsity_of(w) == pytest.approx(0.5)),
        ("sparsegpt-2of4", lambda w: is_nm(w, 2, 4)),
        ("sparsegpt-50-w4g64", lambda w: sparsity_of(w) >= 0.5),
    ],
)
def test_presets_run_through_the_engine(preset, check):
    m = tiny_llama()
    rep = compress(m, preset, data=random_windows(8, 32))
    mods = dict(m.named_modules())
    assert len(rep.layers) == 14
    for name, info in rep.layers.items():
        assert info["methods"] == ["sparsegpt"] and info["pattern"] in ("unstructured 50%", "2:4")
        assert info["sparsity"] >= 0.5 - 1e-9
        assert check(mods[name].weight.data)
    if preset.endswith("w4g64"):
        assert rep.bits_per_weight == pytest.approx(4.25)
    else:
        assert rep.compressed["quantized_linears"] == 0


@pytest.mark.parametrize("static", [True, False])
def test_joint_quantization_with_the_mse_observer(static):
    args = QuantArgs(bits=4, group_size=8, observer="mse", mse_grid=20)
    W, X, H = correlated_problem(rows=8, cols=32, seed=8)
    res = sparsegpt_prune(W, H, 0.5, block_size=16, weights=args, static_groups=static)
    codes = quantize(res.weight, res.qparams, args)
    assert torch.equal(codes, torch.round(codes)) and (res.weight[res.mask] == 0).all()


def _correlated(n=256, c=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(c, c, generator=g)
    x = torch.randn(n, c, generator=g) @ a  # correlated inputs
    return x, 2 * x.t() @ x / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_is_the_least_squares_optimum_for_the_mask(seed):
    from llmpress.prune.sparsegpt import refit_to_mask, sparsegpt_prune

    x, H = _correlated(seed=seed)
    w0 = torch.randn(12, 48, generator=torch.Generator().manual_seed(seed + 10))
    swept = sparsegpt_prune(w0, H, 0.5, per_row=True, block_size=16, damp=0.0)
    fit = refit_to_mask(w0, H, swept.mask, damp=0.0)
    assert bool((fit[swept.mask] == 0).all())
    # the exact per-row least squares with the pruned weights held at zero
    for r in range(w0.shape[0]):
        K = (~swept.mask[r]).nonzero().squeeze(1)
        sol = torch.linalg.lstsq(x[:, K].double(), (x.double() @ w0[r].double()).unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(fit[r, K].double(), sol, rtol=1e-3, atol=1e-3)

    def err(w):
        return float(((x @ (w - w0).t()) ** 2).sum())

    assert err(fit) < err(swept.weight)  # strictly better than the one-directional sweep


def test_refit_option_end_to_end():
    from llmpress.prune.sparsegpt import sparsegpt_prune

    x, H = _correlated(seed=5)
    w0 = torch.randn(16, 48, generator=torch.Generator().manual_seed(7))
    a = sparsegpt_prune(w0, H, 0.5, per_row=True, block_size=16)
    b = sparsegpt_prune(w0, H, 0.5, per_row=True, block_size=16, refit=True)
    assert torch.equal(a.mask, b.mask) and torch.equal(b.weight == 0, b.mask | (w0 == 0))

    def err(w):
        return float(((x @ (w - w0).t()) ** 2).sum())

    assert err(b.weight) < err(a.weight)
    with pytest.raises(Exception, match="refit"):
        sparsegpt_prune(w0, H, 0.5, refit=True, weights=QuantArgs(bits=4, group_size=16))


@pytest.mark.parametrize("seed", [0, 1])
def test_shrink_spans_sparsegpt_to_wanda(seed):
    """``shrink`` 1 leaves only diag(H): the mask is Wanda's (|w| * ||x_j||, per row; one column
    block, so the rows' masks are chosen over all their inputs as Wanda's) and the kept weights
    stay as they were; any shrink below 1 compensates, so its calibration error is below Wanda's."""
    from llmpress.prune.wanda import wanda_mask

    x, H = _correlated(seed=seed)
    w0 = torch.randn(12, 48, generator=torch.Generator().manual_seed(seed + 20))
    kw = dict(per_row=True, block_size=48, damp=0.0, refit=True)
    ends = {s: sparsegpt_prune(w0, H, 0.5, shrink=s, **kw) for s in (0.0, 0.5, 1.0)}
    diag = sparsegpt_prune(w0, H, 0.5, shrink=1.0, per_row=True, block_size=48, damp=0.0)
    want = wanda_mask(w0, torch.diagonal(H).sqrt(), 0.5)
    for r in (ends[1.0], diag):
        assert torch.equal(r.mask, want)
        assert torch.equal(r.weight[~r.mask], w0[~r.mask])  # nothing compensated

    def err(w):
        return float(((x @ (w - w0).t()) ** 2).sum())

    e = {s: err(r.weight) for s, r in ends.items()}
    assert max(e[0.0], e[0.5]) < 0.9 * e[1.0], e
    assert not torch.equal(ends[0.5].weight, ends[0.0].weight)


def test_shrink_is_checked_and_reaches_the_solver():
    with pytest.raises(RecipeError, match="shrink"):
        stage("sparsegpt", shrink=1.5)
    with pytest.raises(RecipeError, match="shrink"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(8), shrink=-0.1)
    assert stage("sparsegpt", shrink=0.5).config.shrink == 0.5
