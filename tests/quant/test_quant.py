"""Quantization primitives: the seeds' formulas, error bounds, grids, observers, accounting."""

from __future__ import annotations

import math

import pytest
import torch

from llmpress.errors import RecipeError, UserError
from llmpress.quant import QuantArgs, compute_qparams, dequantize, fake_quantize, quantize, quantize_weight
from llmpress.quant.core import bits_per_weight, group_view

GRANULARITIES = ("tensor", "channel", "group", "token")


def _data(gran: str, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if gran == "token":  # activations [batch, tokens, hidden]
        x = torch.randn(2, 5, 64, generator=g)
    else:  # weight [out, in]
        x = torch.randn(8, 64, generator=g)
    # different magnitudes per row and a few outliers, so groups really differ
    x = x * torch.linspace(0.1, 3.0, x.shape[-2]).unsqueeze(-1)
    x.view(-1)[::37] *= 6
    return x * scale


def _args(bits: int, sym: bool, gran: str, **kw) -> QuantArgs:
    return QuantArgs(bits=bits, symmetric=sym, granularity=gran, group_size=16 if gran == "group" else None, **kw)


def _per_element(t: torch.Tensor, x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Broadcast a per-group [R, G] tensor to the shape of ``x``."""
    xg = group_view(x, args)
    return t.unsqueeze(-1).expand_as(xg).reshape(x.shape)


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_error_at_most_half_step_inside_range(bits, sym, gran):
    args = _args(bits, sym, gran)
    x = _data(gran, seed=bits)
    qp = compute_qparams(x, args)
    assert qp.scale.shape == group_view(x, args).shape[:2]
    assert (qp.zero_point is None) == sym
    S = _per_element(qp.scale, x, args)
    z = _per_element(qp.zero_point, x, args) if not sym else torch.zeros_like(x)
    # min-max: every value of the calibrated tensor is inside the representable range
    err = (fake_quantize(x, args, qp) - x).abs()
    assert torch.all(err <= S / 2 * (1 + 1e-5) + 1e-7), float((err / S).max())
    # values of a wider tensor (2.5x): those inside [(qmin-z)S, (qmax-z)S] keep the bound,
    # those outside are clamped to the end of the grid
    y = x * 2.5
    lo, hi = (args.qmin - z) * S, (args.qmax - z) * S
    inside = (y >= lo) & (y <= hi)
    assert inside.any() and (~inside).any()
    err = (fake_quantize(y, args, qp) - y).abs()
    assert torch.all(err[inside] <= S[inside] / 2 * (1 + 1e-5) + 1e-7)
    yhat = fake_quantize(y, args, qp)
    torch.testing.assert_close(yhat[y > hi], hi[y > hi], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(yhat[y < lo], lo[y < lo], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_scale_formula(bits, sym, gran):
    args = _args(bits, sym, gran)
    x = _data(gran, seed=10 + bits)
    qp = compute_qparams(x, args)
    xg = group_view(x, args)
    lo, hi = xg.amin(-1), xg.amax(-1)
    if sym:
        expect = torch.maximum(lo.abs(), hi.abs()) / (2 ** (bits - 1) - 1)
        torch.testing.assert_close(qp.scale, expect, rtol=1e-6, atol=0)
    else:
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        expect = (hi - lo) / (2**bits - 1)
        torch.testing.assert_close(qp.scale, expect, rtol=1e-6, atol=0)
        torch.testing.assert_close(qp.zero_point, torch.round(-lo / expect), rtol=0, atol=0)


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_within_range_and_integer(bits, sym, gran):
    args = _args(bits, sym, gran)
    x = _data(gran, seed=bits)
    for observer in ("minmax", "mse"):
        a = _args(bits, sym, gran, observer=observer, mse_grid=20)
        qp = compute_qparams(x, a)
        for inp in (x, 3 * x):  # also values far outside the calibrated range
            q = quantize(inp, qp, a)
            assert q.shape == inp.shape
            assert torch.equal(q, q.round())
            assert int(q.min()) >= args.qmin and int(q.max()) <= args.qmax
    # min-max codes use both ends of the range in every group (the extreme maps to qmax)
    qp = compute_qparams(x, args)
    q = group_view(quantize(x, qp, args), args)
    if sym:
        assert torch.all(q.abs().amax(-1) == args.qmax)
    else:
        assert torch.all(q.amax(-1) == args.qmax)
        assert torch.all(q.amin(-1) == args.qmin)
    assert args.qmin == (-(2 ** (bits - 1)) if sym else 0)
    assert args.qmax == (2 ** (bits - 1) - 1 if sym else 2**bits - 1)


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_grid_values_are_exact(bits, sym, gran):
    args = _args(bits, sym, gran)
    x = _data(gran, seed=bits)
    qp = compute_qparams(x, args)
    # codes of values already on the grid reproduce, and dequantize(quantize) is exact
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(args.qmin, args.qmax + 1, x.shape, generator=g).float()
    on_grid = dequantize(codes, qp, args)
    assert torch.equal(quantize(on_grid, qp, args), codes)
    assert torch.equal(fake_quantize(on_grid, args, qp), on_grid)
    # fake_quantize is idempotent, also when it recomputes the scales of its own output
    y = fake_quantize(x, args)
    assert not torch.equal(y, x)
    torch.testing.assert_close(fake_quantize(y, args), y, rtol=1e-6, atol=1e-7)
    qp2 = compute_qparams(y, args)
    torch.testing.assert_close(qp2.scale, qp.scale, rtol=1e-6, atol=0)
    if not sym:
        assert torch.equal(qp2.zero_point, qp.zero_point)
    torch.testing.assert_close(quantize(y, qp2, args), quantize(x, qp, args), rtol=0, atol=0)


def test_seed_example_int8_per_tensor():
    w = torch.tensor([[1.1, 2.2, 0.1, -0.1, -5.5, -6.6], [1.1, 2.1, 0.1, -0.1, -4.8, -6.6]])
    args = QuantArgs(bits=8, symmetric=True, granularity="tensor")
    qp = compute_qparams(w, args)
    assert qp.scale.shape == (1, 1)
    assert math.isclose(float(qp.scale), 6.6 / 127, rel_tol=1e-6)
    codes = quantize(w, qp, args)
    assert codes.tolist() == [[21, 42, 2, -2, -106, -127], [21, 40, 2, -2, -92, -127]]
    deq = dequantize(codes, qp, args)
    torch.testing.assert_close(deq, torch.tensor([[21, 42, 2, -2, -106, -127], [21, 40, 2, -2, -92, -127]]) * (6.6 / 127))
    wq, qp2 = quantize_weight(w, args)
    assert torch.equal(wq, deq)


def test_seed_example_ternary():
    w = torch.tensor([[1.1, 2.2, 0.1, -0.1, -5.5, -6.6], [1.1, 2.1, 0.1, -0.1, -4.8, -6.0]])
    ratio = 0.3  # s = 0.3 * mean|W| per row: 0.78 and 0.71, between 0.1 and 1.1
    args = QuantArgs(kind="ternary", granularity="channel", ternary_threshold=ratio)
    assert args.bits == 2 and args.qmin == -1 and args.qmax == 1
    # the formula, computed independently per row
    s = ratio * w.abs().mean(1, keepdim=True)
    keep = w.abs() > s
    alpha = torch.stack([w[r].abs()[keep[r]].mean() for r in range(2)])
    torch.testing.assert_close(alpha, torch.tensor([(1.1 + 2.2 + 5.5 + 6.6) / 4, (1.1 + 2.1 + 4.8 + 6.0) / 4]))
    expect = alpha.unsqueeze(1) * torch.sign(w) * keep

    qp = compute_qparams(w, args)
    torch.testing.assert_close(qp.scale.squeeze(1), alpha, rtol=1e-6, atol=0)
    torch.testing.assert_close(qp.threshold.squeeze(1), s.squeeze(1), rtol=1e-6, atol=0)
    codes = quantize(w, qp, args)
    assert codes.tolist() == [[1, 1, 0, 0, -1, -1]] * 2
    torch.testing.assert_close(fake_quantize(w, args), expect, rtol=1e-6, atol=0)
    torch.testing.assert_close(dequantize(codes, qp, args), expect, rtol=1e-6, atol=0)
    # idempotent: the output is already ternary with the same alpha
    torch.testing.assert_close(fake_quantize(expect, args), expect, rtol=1e-6, atol=0)
    # the default ratio 0.7 puts the threshold above 1.1, so those entries drop to 0
    assert (
        quantize(w, compute_qparams(w, QuantArgs(kind="ternary", granularity="channel")), QuantArgs(kind="ternary", granularity="channel")).tolist()
        == [[0, 1, 0, 0, -1, -1]] * 2
    )


def test_seed_example_binary():
    w = torch.tensor([[1.1, 2.2, 0.1, -0.1, -5.5, -6.6], [1.1, 2.1, 0.1, -0.1, -4.8, -6.0]])
    args = QuantArgs(kind="binary", granularity="channel")
    assert args.bits == 1
    alpha = w.abs().mean(1)
    torch.testing.assert_close(alpha, torch.tensor([15.6 / 6, 14.2 / 6]))
    qp = compute_qparams(w, args)
    torch.testing.assert_close(qp.scale.squeeze(1), alpha, rtol=1e-6, atol=0)
    codes = quantize(w, qp, args)
    assert codes.tolist() == [[1, 1, 1, -1, -1, -1]] * 2
    torch.testing.assert_close(fake_quantize(w, args), alpha.unsqueeze(1) * torch.sign(w), rtol=1e-6, atol=0)


def test_sign_grids_per_group_by_hand():
    """The seeds' alphas on a hand-made row, two groups of 4, default ternary threshold 0.7:
    group 1 |w| = .9 .1 .4 2.6 (mean 1.0, threshold .7: keeps .9 and 2.6, alpha 1.75; binary alpha 1.0);
    group 2 |w| = 1 1 1 .2 (mean .8, threshold .56: keeps the three 1s, alpha 1.0; binary alpha .8)."""
    w = torch.tensor([[0.9, -0.1, 0.4, -2.6, 1.0, 1.0, -1.0, 0.2]])
    tern = QuantArgs(kind="ternary", granularity="group", group_size=4)
    qp = compute_qparams(w, tern)
    torch.testing.assert_close(qp.scale, torch.tensor([[1.75, 1.0]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(qp.threshold, torch.tensor([[0.7, 0.56]]), rtol=1e-6, atol=0)
    assert quantize(w, qp, tern).tolist() == [[1, 0, 0, -1, 1, 1, -1, 0]]
    torch.testing.assert_close(fake_quantize(w, tern), torch.tensor([[1.75, 0, 0, -1.75, 1, 1, -1, 0]]), rtol=1e-6, atol=0)
    binary = QuantArgs(kind="binary", granularity="group", group_size=4)
    qp = compute_qparams(w, binary)
    torch.testing.assert_close(qp.scale, torch.tensor([[1.0, 0.8]]), rtol=1e-6, atol=0)
    assert quantize(w, qp, binary).tolist() == [[1, -1, 1, -1, 1, 1, -1, 1]]
    torch.testing.assert_close(fake_quantize(w, binary), torch.tensor([[1, -1, 1, -1, 0.8, 0.8, -0.8, 0.8]]), rtol=1e-6, atol=0)
    # storage: 2 or 1 bits per weight plus one 16-bit alpha per group of 64
    assert bits_per_weight(QuantArgs(kind="ternary", granularity="group", group_size=64), 576, 1536) == 2 + 16 / 64
    assert bits_per_weight(QuantArgs(kind="binary", granularity="group", group_size=64), 576, 1536) == 1 + 16 / 64
    assert bits_per_weight(QuantArgs(kind="binary", granularity="channel"), 576, 1536) == 1 + 16 / 576


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_sign_kinds_per_group(kind, gran):
    x = _data(gran, seed=3)
    args = QuantArgs(kind=kind, granularity=gran, group_size=16 if gran == "group" else None)
    y = fake_quantize(x, args)
    yg, xg = group_view(y, args), group_view(x, args)
    for r in range(xg.shape[0]):
        for c in range(xg.shape[1]):
            v, out = xg[r, c], yg[r, c]
            a = v.abs()
            if kind == "binary":
                alpha, keep = a.mean(), torch.ones_like(a, dtype=torch.bool)
            else:
                keep = a > 0.7 * a.mean()
                alpha = a[keep].mean()
            torch.testing.assert_close(out, alpha * torch.sign(v) * keep, rtol=1e-5, atol=1e-7)


def _lp_err(x, args, qp, p):
    return (group_view(fake_quantize(x, args, qp), args) - group_view(x, args)).abs().pow(p).sum(-1)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [3, 4])
def test_mse_observer_beats_minmax_on_heavy_tails(bits, sym):
    g = torch.Generator().manual_seed(bits)
    # Student-t with 2 degrees of freedom: heavy tails, a few huge values per group
    chi2_over_df = -torch.log(torch.rand(32, 256, generator=g))  # chi2(2) / 2 = Exp(1)
    x = torch.randn(32, 256, generator=g) / torch.sqrt(chi2_over_df)
    for norm in (2.0, 2.4):
        mm = QuantArgs(bits=bits, symmetric=sym, group_size=64, mse_norm=norm)
        ms = QuantArgs(bits=bits, symmetric=sym, group_size=64, observer="mse", mse_norm=norm)
        qmm, qms = compute_qparams(x, mm), compute_qparams(x, ms)
        assert torch.all(qms.scale <= qmm.scale * (1 + 1e-6))  # the search only shrinks the range
        e_mm, e_ms = _lp_err(x, mm, qmm, norm), _lp_err(x, ms, qms, norm)
        assert torch.all(e_ms <= e_mm * (1 + 1e-5) + 1e-9)
        assert e_ms.sum() < 0.97 * e_mm.sum()
        assert (e_ms < e_mm * 0.99).float().mean() > 0.5  # most groups improve strictly
    # the squared error in aggregate is lower too with the default norm
    mm, ms = QuantArgs(bits=bits, symmetric=sym, group_size=64), QuantArgs(bits=bits, symmetric=sym, group_size=64, observer="mse")
    assert _lp_err(x, ms, compute_qparams(x, ms), 2).sum() < _lp_err(x, mm, compute_qparams(x, mm), 2).sum()


def test_mse_observer_importance_weights_the_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g)
    x[:, 0] = 8.0  # an outlier column
    args = QuantArgs(bits=3, granularity="channel", observer="mse")
    plain = compute_qparams(x, args)
    imp = torch.ones(1, 1, 64)
    imp[..., 0] = 1e6  # the outlier column matters most: keep it representable
    weighted = compute_qparams(x, args, importance=imp)
    assert torch.all(weighted.scale > plain.scale)
    torch.testing.assert_close(weighted.scale, compute_qparams(x, QuantArgs(bits=3, granularity="channel")).scale)


def test_group_size_not_dividing_names_layer_and_sizes():
    w = torch.randn(4, 100)
    args = QuantArgs(bits=4, group_size=64)
    for fn in (
        lambda: compute_qparams(w, args, "model.layers.3.mlp.down_proj"),
        lambda: quantize_weight(w, args, "model.layers.3.mlp.down_proj"),
        lambda: fake_quantize(w, args, name="model.layers.3.mlp.down_proj"),
    ):
        with pytest.raises(UserError) as ei:
            fn()
        msg = str(ei.value)
        assert "model.layers.3.mlp.down_proj" in msg and "64" in msg and "100" in msg


def test_bits_per_weight():
    assert bits_per_weight(QuantArgs(bits=4, group_size=64), 576, 1536) == 4.25
    assert bits_per_weight(QuantArgs(bits=4, group_size=128), 576 * 2, 10) == 4.125
    # asymmetric: each group also stores a zero point of `bits` bits
    assert bits_per_weight(QuantArgs(bits=4, symmetric=False, group_size=64), 576, 1536) == 4 + (16 + 4) / 64
    assert bits_per_weight(QuantArgs(bits=3, symmetric=False, group_size=32), 64, 8) == 3 + (16 + 3) / 32
    # per channel: one 16-bit scale per output row of `in_features` weights
    assert bits_per_weight(QuantArgs(bits=8, granularity="channel"), 512, 100) == 8 + 16 / 512
    assert bits_per_weight(QuantArgs(bits=8, granularity="tensor"), 512, 100) == 8 + 16 / (512 * 100)
    assert bits_per_weight(QuantArgs(bits=8, granularity="channel", scale_bits=32), 512, 100) == 8 + 32 / 512
    assert bits_per_weight(QuantArgs(kind="ternary", granularity="channel"), 64, 4) == 2 + 16 / 64
    assert bits_per_weight(QuantArgs(kind="binary", granularity="group", group_size=128), 256, 4) == 1 + 16 / 128
    assert bits_per_weight(QuantArgs(kind="binary", symmetric=False, granularity="group", group_size=128), 256, 4) == 1 + 16 / 128


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bits=9), "bits"),
        (dict(bits=1), "bits"),
        (dict(granularity="row"), "granularity"),
        (dict(granularity="group", group_size=None), "group_size"),
        (dict(granularity="group", group_size=0), "group_size"),
        (dict(kind="float"), "kind"),
        (dict(observer="percentile"), "observer"),
        (dict(mse_maxshrink=1.5), "mse_maxshrink"),
        (dict(clip_ratio=0.0), "clip_ratio"),
        (dict(clip_ratio=1.2), "clip_ratio"),
        (dict(kind="ternary", clip_ratio=0.9), "clip_ratio"),
    ],
)
def test_quantargs_validation(kwargs, field):
    with pytest.raises(RecipeError) as ei:
        QuantArgs(**kwargs)
    assert field in str(ei.value)
    # from a recipe mapping the message also says where
    with pytest.raises(RecipeError) as ei:
        QuantArgs.from_dict(kwargs, "recipe.stages[0].weights")
    assert field in str(ei.value) and "recipe.stages[0].weights" in str(ei.value)


def test_quantargs_unknown_field_and_normalisation():
    with pytest.raises(RecipeError) as ei:
        QuantArgs.from_dict({"bits": 4, "groupsize": 64}, "stages[0].weights")
    assert "groupsize" in str(ei.value) and "stages[0].weights" in str(ei.value)
    assert QuantArgs(granularity="channel", group_size=64).group_size is None
    assert QuantArgs(kind="ternary", bits=5).bits == 2
    a = QuantArgs(bits=3, symmetric=False, group_size=32, observer="mse")
    assert QuantArgs.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_full_range_symmetric_grid_uses_every_code(bits):
    from llmpress.quant import QuantArgs, quantize_weight
    from llmpress.quant.core import compute_qparams

    torch.manual_seed(0)
    w = torch.randn(64, 256)
    full = QuantArgs(bits=bits, group_size=64, full_range=True)
    rest = QuantArgs(bits=bits, group_size=64)
    qp = compute_qparams(w, full)
    codes = torch.round(w.reshape(64, 4, 64) / qp.scale.unsqueeze(-1)).clamp(full.qmin, full.qmax)
    assert int(codes.min()) == full.qmin and int(codes.max()) == full.qmax  # all 2^b levels
    amax = w.reshape(64, 4, 64).abs().amax(-1)
    assert torch.allclose(qp.scale, amax / (full.qmax + 0.5))
    e_full = (quantize_weight(w, full)[0] - w).pow(2).mean()
    e_rest = (quantize_weight(w, rest)[0] - w).pow(2).mean()
    if bits <= 4:  # the finer step wins on Gaussian weights at low bits (at 8 bits the clip costs more)
        assert e_full < e_rest
    with pytest.raises(RecipeError, match="full_range"):
        QuantArgs(bits=4, symmetric=False, full_range=True)


@pytest.mark.parametrize("sym", [True, False])
def test_clip_ratio_scales_the_range_and_clamps_the_tail(sym):
    torch.manual_seed(0)
    x = torch.randn(32, 128)
    args = QuantArgs(bits=4, symmetric=sym, granularity="token", clip_ratio=0.9)
    plain = QuantArgs(bits=4, symmetric=sym, granularity="token")
    qp, qp0 = compute_qparams(x, args), compute_qparams(x, plain)
    if sym:
        assert torch.allclose(qp.scale, qp0.scale * 0.9)
    else:
        lo, hi = x.amin(1).clamp_max(0) * 0.9, x.amax(1).clamp_min(0) * 0.9
        assert torch.allclose(qp.scale[:, 0], (hi - lo) / 15)
    y = fake_quantize(x, args)
    if not sym:  # the tail is clamped: the largest value reaches the clipped range (+ half a step)
        assert y.amax(1).le(x.amax(1) * 0.9 + qp.scale[:, 0] / 2 + 1e-6).all()
    else:  # entries beyond the clipped range land exactly on the top code
        top = 0.9 * x.abs().amax(1, keepdim=True)
        tail = x > top
        assert tail.any() and torch.allclose(y[tail], top.expand_as(x)[tail])
    # on Gaussian rows at 4 bits the smaller step lowers the mean squared error
    assert (y - x).pow(2).mean() < (fake_quantize(x, plain) - x).pow(2).mean()
    assert "clip0.9" in args.describe()
    assert QuantArgs.from_dict(args.to_dict()) == args
