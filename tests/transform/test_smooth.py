"""SmoothQuant / OS+ shift: scale formula, folding keeps the float model, method end to end."""

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama
from helpers import logits, rel_err

from llmpress import compress, stage
from llmpress.arch import blocks, get_arch, get_module
from llmpress.errors import RecipeError
from llmpress.quant import QuantArgs
from llmpress.transform.scaling import (
    NormShift,
    apply_smoothing,
    fold_norm_weight,
    group_channels,
    head_geometry,
    heads_to_kv,
    kv_to_heads,
    scale_groups,
    smooth_scales,
)

W8 = QuantArgs(bits=8, granularity="channel")
A8 = QuantArgs(bits=8, granularity="token")
A8_TENSOR = QuantArgs(bits=8, granularity="tensor")


def test_smooth_scale_formula():
    x = torch.tensor([4.0, 1.0, 100.0, 0.0])
    w = torch.tensor([0.5, 2.0, 0.1, 1.0])
    for alpha in (0.0, 0.5, 0.85, 1.0):
        s = smooth_scales(x, w, alpha, eps=1e-5)
        ref = x.clamp_min(1e-5).double() ** alpha / w.double() ** (1 - alpha)
        assert torch.allclose(s.double(), ref.clamp_min(1e-5), rtol=1e-6)
    # alpha = 0.5 equalizes the ranges: max|X_j| / s_j == max|W_j| * s_j
    s = smooth_scales(x[:3], w[:3], 0.5)
    assert torch.allclose(x[:3] / s, w[:3] * s, rtol=1e-5)


@pytest.mark.parametrize("kind", ["rms", "rms_1p"])
def test_fold_norm_weight_divides_output(kind):
    torch.manual_seed(0)
    w = torch.randn(8) * 0.3
    s = torch.rand(8) + 0.5
    eff = (lambda v: v) if kind == "rms" else (lambda v: 1 + v)
    assert torch.allclose(eff(fold_norm_weight(w, s, kind)), eff(w) / s, atol=1e-6)


def test_gqa_head_expansion_roundtrip():
    m = tiny_llama()
    spec = get_arch(m)
    geo = head_geometry(blocks(m)[0], spec)
    assert (geo.n_heads, geo.n_kv, geo.head_dim) == (4, 2, 16)
    kv = torch.arange(geo.n_kv * geo.head_dim, dtype=torch.float32)
    cols = kv_to_heads(kv, geo)
    # query heads 0,1 read kv head 0; heads 2,3 read kv head 1 (HF repeat_kv order)
    assert torch.equal(cols[:16], kv[:16]) and torch.equal(cols[16:32], kv[:16]) and torch.equal(cols[32:48], kv[16:])
    assert torch.equal(heads_to_kv(cols, geo, "max"), kv)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("shift", [False, True])
def test_folding_keeps_float_model(make, shift):
    """Random scales (and shifts) folded into every norm, v->o and up->down pair."""
    m = make()
    spec = get_arch(m)
    ids = random_windows(2, 24)
    ref = logits(m, ids)
    g = torch.Generator().manual_seed(1)
    for blk in blocks(m):
        for grp in scale_groups(spec):
            n = group_channels(blk, spec, grp)
            s = torch.exp(0.7 * torch.randn(n, generator=g))
            z = torch.randn(n, generator=g) if shift and grp.kind != "up" else None
            apply_smoothing(blk, spec, grp, s, z)
    assert rel_err(logits(m, ids), ref) < 1e-4
    if shift:
        assert isinstance(get_module(blocks(m)[0], spec.norm_feeds[0].norm), NormShift)
        assert get_module(blocks(m)[0], spec.o).bias is not None


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("cfg", [dict(search=False, alpha=0.5), dict(grid=3, search_windows=4), dict(search=False, alpha=0.8, shift=True)])
def test_smoothquant_method_keeps_float_model(make, cfg):
    m = make()
    ids = random_windows(2, 24, seed=3)
    ref = logits(m, ids)
    rep = compress(m, [stage("smoothquant", **cfg)], random_windows(8, 24))
    assert rel_err(logits(m, ids), ref) < 1e-4
    layer = rep.layers["model.layers.0.self_attn.q_proj"]
    assert layer["methods"] == ["smoothquant"] and "alpha" in layer["smoothquant"]


def _outlier_llama():
    """A tiny llama whose attention/MLP norms emit a few huge channels (like real LLMs)."""
    m = tiny_llama()
    with torch.no_grad():
        for blk in m.model.layers:
            for norm in (blk.input_layernorm, blk.post_attention_layernorm):
                norm.weight[[3, 17, 40]] = 60.0
    return m


def test_smoothquant_reduces_w8a8_error_with_outlier_channels():
    calib, ids = random_windows(8, 32), random_windows(2, 32, seed=7)
    base = _outlier_llama()
    ref = logits(base, ids)
    rtn = _outlier_llama()
    compress(rtn, [stage("rtn", weights=W8, activations=A8_TENSOR)])
    sq = _outlier_llama()
    compress(sq, [stage("smoothquant", grid=5, search_windows=8, activations=A8_TENSOR), stage("rtn", weights=W8, activations=A8_TENSOR)], calib)
    e_rtn, e_sq = rel_err(logits(rtn, ids), ref), rel_err(logits(sq, ids), ref)
    assert e_sq < 0.7 * e_rtn, (e_sq, e_rtn)


def test_smoothquant_config_errors():
    with pytest.raises(RecipeError, match="alpha"):
        stage("smoothquant", alpha=1.5)
    with pytest.raises(RecipeError, match="grid"):
        stage("smoothquant", grid=0)
    assert stage("smoothquant", search=False, alpha=0.7).config.alphas() == [0.7]
    assert stage("smoothquant", grid=3).config.alphas() == [None, 0.0, 0.5, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_smoothing_real_models_keeps_float_output(alias):
    """GQA (SmolLM2: 9 query / 3 kv heads; gemma: (1 + w) norms, activations ~1e5)."""
    from llmpress import models

    m, _ = models.load(alias)
    ids = random_windows(1, 64, vocab=1000, seed=2)
    ref = logits(m, ids)
    compress(m, [stage("smoothquant", search=False, alpha=0.8, shift=True)], random_windows(2, 64, vocab=1000))
    assert rel_err(logits(m, ids), ref) < 1e-4


def test_smoothquant_per_group_alphas():
    m = _outlier_llama()
    ids = random_windows(2, 24, seed=3)
    ref = logits(m, ids)
    rep = compress(m, [stage("smoothquant", grid=3, per_group=True, search_windows=4)], random_windows(8, 24))
    assert rel_err(logits(m, ids), ref) < 1e-4
    notes = {n: lr["smoothquant"]["alpha"] for n, lr in rep.layers.items()}
    assert all(a in (None, 0.0, 0.5, 1.0) for a in notes.values())
    # q/k/v share a group, hence an alpha
    assert notes["model.layers.0.self_attn.q_proj"] == notes["model.layers.0.self_attn.v_proj"]
