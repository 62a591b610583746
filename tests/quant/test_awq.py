"""AWQ: scale formula, clip search, folding keeps the float model, quantized error vs RTN."""

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama
from helpers import logits, rel_err

from llmpress import compress, stage
from llmpress.errors import RecipeError
from llmpress.quant import QuantArgs, fake_quantize
from llmpress.quant.awq import apply_clip, awq_scales, clip_search, scaled_fake_quant
from llmpress.quant.core import group_view

W3 = QuantArgs(bits=3, group_size=32)


def test_awq_scales_formula():
    x = torch.tensor([0.1, 1.0, 10.0, 2.0])
    assert torch.allclose(awq_scales(x, 0.0), torch.ones(4))
    for a in (0.25, 0.5, 1.0):
        s = awq_scales(x, a)
        ref = x.double() ** a
        ref = ref / (ref.max() * ref.min()).sqrt()
        assert torch.allclose(s.double(), ref, rtol=1e-6)
        assert abs(float(s.max() * s.min()) - 1.0) < 1e-5


def test_scaled_fake_quant_identity_and_protection():
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    assert torch.equal(scaled_fake_quant(w, torch.ones(64), W3), fake_quantize(w, W3))
    # a scaled-up channel gets a finer relative grid: its error shrinks
    s = torch.ones(64)
    s[5] = 4.0
    e_plain = (fake_quantize(w, W3) - w)[:, 5].abs().mean()
    e_scaled = (scaled_fake_quant(w, s, W3) - w)[:, 5].abs().mean()
    assert e_scaled < e_plain


def _group_err(w, x, args, ratio):
    qw = fake_quantize(apply_clip(w, ratio, args), args)
    wg, qg = group_view(w, args), group_view(qw, args)
    xg = x.reshape(x.shape[0], *wg.shape[1:])
    return (torch.einsum("ogk,tgk->ogt", wg - qg, xg)).pow(2).mean(-1)


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_never_worse_than_no_clip(sym):
    torch.manual_seed(0)
    args = QuantArgs(bits=3, group_size=16, symmetric=sym)
    w = torch.randn(8, 64)
    w[0, 3] = 8.0  # an outlier stretches its group's range
    x = torch.randn(256, 64)
    ratio = clip_search(w, x, args, grid=20, max_shrink=0.5)
    assert ratio.shape == (8, 4)
    assert float(ratio.min()) > 0.5 - 1e-6 and float(ratio.max()) <= 1.0
    assert (ratio < 1).any()
    assert (_group_err(w, x, args, ratio) <= _group_err(w, x, args, torch.ones_like(ratio)) + 1e-6).all()
    # clipping: a later min-max quantizer sees exactly ratio * range
    wc = group_view(apply_clip(w, ratio, args), args)
    wg = group_view(w, args)
    if sym:
        assert torch.allclose(wc.abs().amax(-1), wg.abs().amax(-1) * ratio, rtol=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_awq_scaling_alone_keeps_float_model(make):
    m = make()
    ids = random_windows(2, 24, seed=3)
    ref = logits(m, ids)
    rep = compress(m, [stage("awq", weights=W3, quantize=False, clip=False, grid=5, search_windows=4)], random_windows(8, 24))
    assert rel_err(logits(m, ids), ref) < 1e-4
    note = rep.layers["model.layers.0.self_attn.q_proj"]["awq"]
    assert 0.0 <= note["alpha"] <= 1.0
    assert rep.compressed["quantized_linears"] == 0


def test_awq_beats_rtn_on_outlier_channels():
    def outlier_llama():
        m = tiny_llama()
        with torch.no_grad():
            for blk in m.model.layers:
                for norm in (blk.input_layernorm, blk.post_attention_layernorm):
                    norm.weight[[3, 17, 40]] = 20.0
        return m

    calib, ids = random_windows(8, 32), random_windows(2, 32, seed=7)
    ref = logits(outlier_llama(), ids)
    rtn = outlier_llama()
    compress(rtn, [stage("rtn", weights=W3)])
    aw = outlier_llama()
    rep = compress(aw, [stage("awq", weights=W3, grid=10, search_windows=8)], calib)
    assert rep.compressed["quantized_linears"] == 14
    assert abs(rep.bits_per_weight - (3 + 16 / 32)) < 1e-9
    assert rel_err(logits(aw, ids), ref) < rel_err(logits(rtn, ids), ref)


def test_awq_then_gptq_recipe():
    """AWQ's scales folded into the norms, then GPTQ on the scaled weights: on the W3 grid,
    closer to the float model than RTN W3."""
    from llmpress.quant import quantize

    ids = random_windows(2, 24, seed=20)
    ref = logits(tiny_llama(), ids)
    rtn = tiny_llama()
    compress(rtn, [stage("rtn", weights=W3)])
    m = tiny_llama()
    norms = [blk.input_layernorm.weight.detach().clone() for blk in m.model.layers]
    rep = compress(m, [stage("awq", weights=W3, quantize=False, grid=3, search_windows=4), stage("gptq", weights=W3)], random_windows(8, 24))
    layer = rep.layers["model.layers.0.mlp.down_proj"]
    assert layer["methods"] == ["awq", "gptq"]
    assert layer["weights"] == W3.describe()
    assert 0.0 <= layer["awq"]["alpha"] <= 1.0
    assert any(not torch.equal(blk.input_layernorm.weight, n) for blk, n in zip(m.model.layers, norms))  # scales folded
    for name, rec in rep.result.records.items():
        codes = quantize(dict(m.named_modules())[name].weight.data, rec.qparams, rec.weight_args)
        assert torch.equal(codes, torch.round(codes)) and -4 <= codes.min() and codes.max() <= 3, name
    assert rel_err(logits(m, ids), ref) < 0.95 * rel_err(logits(rtn, ids), ref)


def test_awq_config_errors():
    with pytest.raises(RecipeError, match="clip_max_shrink"):
        stage("awq", clip_max_shrink=1.0)
    with pytest.raises(RecipeError, match="token"):
        stage("awq", weights=QuantArgs(bits=4, granularity="token"))
