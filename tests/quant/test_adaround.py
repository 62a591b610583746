"""AdaRound / AdaQuant: the relaxation reaches hard codes and beats nearest rounding, the
learned scales never widen the grid, determinism, bad input, and a tiny model end to end."""

from dataclasses import replace

import pytest
import torch
from conftest import random_windows, tiny_llama, tiny_tokenizer
from helpers import QUIET
from obs_problems import correlated_problem, output_error

import llmpress
from llmpress import RecipeError, UserError, api, compress, load_recipe, stage
from llmpress.quant import QuantArgs, compute_qparams, dequantize, quantize, quantize_weight
from llmpress.quant.adaround import AdaRound
from llmpress.quant.adaround_core import (
    AdaRoundOptions,
    adaround_quantize,
    beta_at,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
    rounding_penalty,
)
from llmpress.quant.hessian import layer_error

W4G16 = QuantArgs(bits=4, group_size=16)
ARGS = [
    W4G16,
    QuantArgs(bits=3, granularity="channel"),
    QuantArgs(bits=2, group_size=16, symmetric=False),
    QuantArgs(bits=4, group_size=16, full_range=True),
]


def test_relaxation_pieces():
    h = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    inner = h[1:4]
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(inner)), inner, atol=1e-6)
    assert rectified_sigmoid(torch.tensor([-50.0, 50.0])).tolist() == [0.0, 1.0]  # reaches the ends exactly
    assert float(rounding_penalty(torch.tensor([0.0, 1.0]), 2.0)) == 0.0
    assert float(rounding_penalty(torch.tensor([0.5]), 2.0)) == 1.0
    o = AdaRoundOptions(iters=11, warmup=0.2)
    assert beta_at(0, o) is None and beta_at(1, o) is None
    assert beta_at(2, o) == 20.0 and beta_at(10, o) == pytest.approx(2.0)


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
def test_learned_rounding_reaches_hard_codes_and_beats_nearest(args):
    for seed in range(3):
        W, X, H = correlated_problem(rows=16, cols=32, seed=seed)
        res = adaround_quantize(W, H, args, options=AdaRoundOptions(iters=300))
        rtn, _ = quantize_weight(W, args)
        assert not res.kept_rtn and res.undecided < 0.1, (seed, res.undecided)
        assert res.error == pytest.approx(layer_error(W, res.weight, H), rel=1e-9)
        assert res.error_rtn == pytest.approx(layer_error(W, rtn, H), rel=1e-6)
        assert output_error(W, res.weight, X) < 0.9 * output_error(W, rtn, X), seed
        assert 0.0 < res.flipped < 0.5
        # hard codes on the grid: integers within range that dequantize to the weight exactly
        codes = quantize(res.weight, res.qparams, args)
        assert codes.min() >= args.qmin and codes.max() <= args.qmax
        assert torch.equal(dequantize(codes, res.qparams, args), res.weight)
        # each code is nearest rounding or its neighbour (the relaxation picks down or up)
        assert (codes - quantize(W, res.qparams, args)).abs().max() <= 1


def test_learned_scale_never_widens_beyond_minmax():
    for args in (W4G16, QuantArgs(bits=3, group_size=16, symmetric=False), QuantArgs(bits=3, group_size=16, observer="mse")):
        W, X, H = correlated_problem(rows=16, cols=32, seed=1)
        W[0, 3] = 12.0  # an outlier: a narrower scale is worth it for the other weights of its group
        res = adaround_quantize(W, H, args, options=AdaRoundOptions(iters=300, learn_scale=True, scale_lr=1e-2))
        minmax = compute_qparams(W, replace(args, observer="minmax"))
        assert (res.qparams.scale <= minmax.scale).all()
        assert (res.qparams.scale >= 0.5 * minmax.scale * (0.2 if args.observer == "mse" else 1.0) - 1e-9).all()
        assert (res.qparams.scale < minmax.scale).any()  # it did learn something
        codes = quantize(res.weight, res.qparams, args)
        assert torch.equal(dequantize(codes, res.qparams, args), res.weight)
        fixed = adaround_quantize(W, H, args, options=AdaRoundOptions(iters=300))
        assert res.error <= fixed.error * 1.05


def test_deterministic():
    W, _, H = correlated_problem(rows=16, cols=32, seed=2)
    a = adaround_quantize(W, H, W4G16, options=AdaRoundOptions(iters=50, learn_scale=True))
    b = adaround_quantize(W, H, W4G16, options=AdaRoundOptions(iters=50, learn_scale=True))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.qparams.scale, b.qparams.scale) and a.error == b.error


def test_keeps_nearest_rounding_when_learning_loses():
    # lam = 0 and one step: the soft codes never settle, the hard ones may lose; never worse than nearest
    for seed in range(3):
        W, _, H = correlated_problem(rows=8, cols=16, seed=seed)
        res = adaround_quantize(W, H, W4G16, options=AdaRoundOptions(iters=1, lam=0.0))
        assert res.error <= res.error_rtn


@pytest.mark.parametrize(
    "fields,fragment",
    [
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": -1e-3}, "lr=-0.001"),
        ({"iters": 0}, "iters=0"),
        ({"lam": -1.0}, "lam=-1.0"),
        ({"scale_min": 0.0}, "scale_min"),
        ({"warmup": 1.0}, "warmup"),
        ({"damp": -0.1}, "damp=-0.1"),
        ({"weights": QuantArgs(kind="ternary")}, "integer grids"),
        ({"learn_scale": True, "weights": QuantArgs(scale_dtype="float16")}, "scale_dtype"),
    ],
)
def test_bad_config(fields, fragment):
    with pytest.raises(RecipeError, match=fragment):
        AdaRound(**fields)
    with pytest.raises(UserError):  # the pure function refuses the same
        if "weights" in fields:
            adaround_quantize(
                torch.ones(2, 16), torch.eye(16), fields["weights"], options=AdaRoundOptions(learn_scale=fields.get("learn_scale", False))
            )
        else:
            AdaRoundOptions(**fields)


def test_damping_trades_calibration_error_for_held_out_error():
    """Damped, the loss gains a plain weight-error term: on inputs whose channels do not
    correlate as the calibration ones do, the error falls (towards nearest rounding's), and on
    the calibration inputs it rises; far damping gives nearest rounding's codes."""
    g = torch.Generator().manual_seed(7)
    held_out = torch.randn(2048, 32, generator=g) * torch.logspace(-0.5, 0.5, 32)  # same channel scales, no mixing
    for seed in range(3):
        W, X, H = correlated_problem(rows=16, cols=32, seed=seed)
        rtn, _ = quantize_weight(W, W4G16)
        res = {d: adaround_quantize(W, H, W4G16, options=AdaRoundOptions(iters=300, damp=d)) for d in (0.0, 1.0, 1e6)}
        held = {d: output_error(W, r.weight, held_out) for d, r in res.items()}
        calib = {d: output_error(W, r.weight, X) for d, r in res.items()}
        assert held[1.0] < held[0.0] and calib[1.0] > calib[0.0], (seed, held, calib)
        assert res[1e6].flipped < 0.01 and held[1e6] <= 1.01 * output_error(W, rtn, held_out), seed


def test_bad_recipe_field_names_it():
    with pytest.raises(RecipeError, match="lr"):
        stage("adaround", lr=0)
    with pytest.raises(UserError, match="group_size 48"):
        adaround_quantize(torch.ones(2, 64), torch.eye(64), QuantArgs(group_size=48))


def test_presets_parse():
    for name, bits, damp in (("adaround-w4g64", 4, 1.0), ("adaround-w3g64", 3, 0.0)):  # W4's damping by the held-out rule
        cfg = load_recipe(name).stages[0].config
        assert isinstance(cfg, AdaRound) and cfg.weights.bits == bits and cfg.weights.group_size == 64 and cfg.iters == 100
        assert cfg.damp == damp


def test_tiny_model_compresses_saves_and_reloads(tmp_path):
    m = tiny_llama()
    args = QuantArgs(bits=3, group_size=32)
    ref = tiny_llama()
    data = random_windows(8, 32)
    rep = compress(m, stage("adaround", weights=args, iters=60), data=data, engine=QUIET)
    recs = rep.result.records
    assert len(recs) == 14
    assert all(r.notes["adaround_error"] <= r.notes["adaround_error_rtn"] for r in recs.values())
    assert sum(r.notes["adaround_flipped"] > 0 for r in recs.values()) >= 10
    # the learned weights differ from both the dense and the nearest-rounding ones
    rtn = tiny_llama()
    compress(rtn, stage("rtn", weights=args), engine=QUIET)
    name = "model.layers.0.self_attn.q_proj"
    q = lambda mod: dict(mod.named_modules())[name].weight  # noqa: E731
    assert not torch.equal(q(m), q(rtn)) and not torch.equal(q(m), q(ref))
    ids = random_windows(2, 24, seed=3)
    with torch.no_grad():
        want = m(ids).logits
    out = api.save(m, tiny_tokenizer(), tmp_path / "ck", report=rep)
    loaded, _ = llmpress.load_compressed(str(out), backend="dequant")
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, want)
    r = loaded.llmpress_records[name]
    assert r.weight_args == args and torch.equal(r.qparams.scale, recs[name].qparams.scale)


def test_learned_scale_model_saves_packed(tmp_path):
    m = tiny_llama()
    rep = compress(
        m,
        stage("adaround", weights=QuantArgs(bits=4, group_size=32, symmetric=False), iters=30, learn_scale=True),
        data=random_windows(4, 32),
        engine=QUIET,
    )
    ids = random_windows(2, 16, seed=5)
    with torch.no_grad():
        want = m(ids).logits
    out = api.save(m, None, tmp_path / "ck", report=rep)
    loaded, _ = llmpress.load_compressed(str(out), backend="dequant")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
