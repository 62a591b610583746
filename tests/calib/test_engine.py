"""The sequential engine: statistics each linear receives, propagation, data-free and act-quant paths."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from conftest import TINY_MODELS, random_windows, tiny_llama
from helpers import logits, rel_err

from llmpress import compress, stage
from llmpress.calib import engine as engine_mod
from llmpress.calib.engine import EngineOptions
from llmpress.errors import UserError
from llmpress.quant import QuantArgs, fake_quantize, quantize_weight
from llmpress.quant.core import group_view
from llmpress.registry import METHODS, register
from llmpress.runtime.act_quant import ActQuantLinear

IDENT = "_test_engine_identity_stats"
PERTURB = "_test_engine_quantize_block0"

SEEN: dict[str, dict] = {}  # full linear name -> statistics the handler received
OFFLOAD_SEEN: list[list[str]] = []  # files in the offload folder while the engine ran


@dataclass(frozen=True)
class _IdentityCfg:
    offload_dir: str = ""  # when set, the handler lists what lies in this folder


@dataclass(frozen=True)
class _PerturbCfg:
    prefix: str = "model.layers.0."


def _keep_stats(ctx, cfg):
    SEEN[ctx.name] = {k: (dict(v) if isinstance(v, dict) else v.clone()) for k, v in ctx.stats.items()}
    if getattr(cfg, "offload_dir", ""):
        OFFLOAD_SEEN.append([os.path.join(r, f) for r, _, fs in os.walk(cfg.offload_dir) for f in fs])


if IDENT not in METHODS:
    register(IDENT, _IdentityCfg, needs=("hessian", "channel_stats"), summary="test: keep statistics, change nothing")(_keep_stats)

if PERTURB not in METHODS:

    @register(PERTURB, _PerturbCfg, needs=("hessian", "channel_stats"), summary="test: 3-bit per-channel RTN on one block")
    def _perturb(ctx, cfg):
        _keep_stats(ctx, cfg)
        if ctx.name.startswith(cfg.prefix):
            ctx.set_weight(fake_quantize(ctx.weight, QuantArgs(bits=3, granularity="channel")))


@pytest.fixture(autouse=True)
def _clear():
    SEEN.clear()
    OFFLOAD_SEEN.clear()
    yield
    SEEN.clear()
    OFFLOAD_SEEN.clear()


def _block_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")}


@torch.no_grad()
def reference_stats(model, windows: torch.Tensor) -> dict[str, dict]:
    """H = 2/n X^T X and per-channel statistics of every block linear's input, from a plain forward."""
    sums: dict[str, list] = {}
    handles = []
    for name, mod in _block_linears(model).items():

        def hook(_m, inputs, _name=name):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            s = sums.setdefault(_name, [0.0, 0, 0.0, None, 0.0])
            s[0] = s[0] + x.T @ x
            s[1] += x.shape[0]
            s[2] = s[2] + x.pow(2).sum(0)
            am = x.abs().amax(0)
            s[3] = am if s[3] is None else torch.maximum(s[3], am)
            s[4] = s[4] + x.abs().sum(0)

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {
        n: {"hessian": (2.0 / s[1] * s[0]).float(), "l2": s[2].sqrt().float(), "absmax": s[3].float(), "mean_abs": (s[4] / s[1]).float(), "n": s[1]}
        for n, s in sums.items()
    }


def _assert_stats_match(seen: dict, ref: dict, names=None):
    names = list(ref) if names is None else names
    assert names
    for n in names:
        H, Href = seen[n]["hessian"], ref[n]["hessian"]
        assert H.dtype == torch.float32 and H.shape == Href.shape == (H.shape[0], H.shape[0])
        assert (H - Href).abs().max() <= 1e-5 * max(1.0, Href.abs().max()), n
        cs = seen[n]["channel_stats"]
        assert cs["n"] == ref[n]["n"]
        for k in ("l2", "absmax", "mean_abs"):
            torch.testing.assert_close(cs[k], ref[n][k], rtol=1e-5, atol=1e-6, msg=f"{n} {k}")


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
@pytest.mark.parametrize("true_sequential", [False, True])
@pytest.mark.parametrize("offload", [False, True])
def test_identity_solver_sees_exact_hessians_and_changes_nothing(family, true_sequential, offload, tmp_path):
    model = TINY_MODELS[family]()
    calib = random_windows(8, 32)
    ref = reference_stats(model, calib)
    probe = random_windows(3, 24, seed=1)
    before = logits(model, probe)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    off = tmp_path / "offload"
    if offload:
        off.mkdir()
    opts = EngineOptions(batch_size=3, true_sequential=true_sequential, offload_dir=str(off) if offload else None, progress=False)
    rep = compress(model, [stage(IDENT, offload_dir=str(off) if offload else "")], calib, engine=opts)

    assert set(SEEN) == set(ref) and len(SEEN) == 14  # 2 blocks x 7 linears, lm_head ignored
    _assert_stats_match(SEEN, ref)
    assert torch.equal(logits(model, probe), before)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert not any(isinstance(m, ActQuantLinear) for m in model.modules())
    assert rep.calibration["windows"] == 8 and rep.calibration["seqlen"] == 32
    assert rep.compressed["quantized_linears"] == 0
    if offload:
        # activations went to disk while the engine ran, and nothing is left afterwards
        assert OFFLOAD_SEEN and all(files and all(f.endswith(".safetensors") for f in files) for files in OFFLOAD_SEEN)
        assert list(off.iterdir()) == []


def test_offload_dir_is_created_when_missing(tmp_path):
    model = tiny_llama()
    calib = random_windows(4, 16)
    ref = reference_stats(model, calib)
    off = tmp_path / "not" / "yet"
    compress(model, [stage(IDENT, offload_dir=str(off))], calib, engine=EngineOptions(batch_size=2, offload_dir=str(off), progress=False))
    assert OFFLOAD_SEEN and all(OFFLOAD_SEEN)
    _assert_stats_match(SEEN, ref)
    assert not off.exists() or list(off.iterdir()) == []


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
@pytest.mark.parametrize("true_sequential", [False, True])
def test_later_blocks_see_compressed_outputs(family, true_sequential):
    model = TINY_MODELS[family]()
    calib = random_windows(8, 32, seed=2)
    ref_orig = reference_stats(model, calib)
    w0 = model.model.layers[0].mlp.down_proj.weight.clone()
    w1 = model.model.layers[1].mlp.down_proj.weight.clone()
    compress(model, [stage(PERTURB)], calib, engine=EngineOptions(batch_size=4, true_sequential=true_sequential, progress=False))
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, w0)  # block 0 was modified
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, w1)  # block 1 was not
    ref_mod = reference_stats(model, calib)  # plain forward of the *modified* model
    block1 = [n for n in ref_mod if n.startswith("model.layers.1.")]
    block0 = [n for n in ref_mod if n.startswith("model.layers.0.")]
    assert len(block1) == len(block0) == 7
    _assert_stats_match(SEEN, ref_mod, block1)
    for n in block1:  # the modification really reaches block 1: original statistics differ
        assert (ref_orig[n]["hessian"] - ref_mod[n]["hessian"]).abs().max() > 1e-3 * ref_orig[n]["hessian"].abs().max()
    qkv = [n for n in block0 if any(p in n for p in ("q_proj", "k_proj", "v_proj"))]
    _assert_stats_match(SEEN, ref_orig, qkv)  # inputs of block 0's first linears do not change
    if true_sequential:
        # each group of block 0 saw the outputs of the groups compressed before it
        _assert_stats_match(SEEN, ref_mod, block0)
    else:
        # all of block 0's statistics were gathered before any of its linears changed
        _assert_stats_match(SEEN, ref_orig, block0)
        n = "model.layers.0.mlp.down_proj"
        assert (ref_orig[n]["hessian"] - ref_mod[n]["hessian"]).abs().max() > 1e-3 * ref_orig[n]["hessian"].abs().max()


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_rtn_is_data_free(family, monkeypatch):
    model = TINY_MODELS[family]()

    def no_capture(*a, **k):
        raise AssertionError("a data-free recipe must not run the calibration forward")

    monkeypatch.setattr(engine_mod, "capture_block_inputs", no_capture)
    args = QuantArgs(bits=4, group_size=32)
    expect = {n: quantize_weight(m.weight.data.clone(), args, n)[0] for n, m in _block_linears(model).items()}
    embed = model.model.embed_tokens.weight.clone()
    rep = compress(model, [stage("rtn", weights=args)])  # no data, no tokenizer
    assert rep.calibration == {}
    assert rep.compressed["quantized_linears"] == 14
    for n, m in _block_linears(model).items():
        assert torch.equal(m.weight.data, expect[n]), n
        # on the 4-bit grid: at most 16 distinct values per group of 32
        wg = group_view(m.weight.data, args)
        assert max(len(torch.unique(wg[r, c])) for r in range(wg.shape[0]) for c in range(wg.shape[1])) <= 16
    assert torch.equal(model.model.embed_tokens.weight, embed)  # lm_head (tied) ignored
    assert set(rep.layers) == set(expect)
    assert all(v["bits_per_weight"] == 4.5 for v in rep.layers.values())


def test_stats_recipe_without_data_or_tokenizer_is_a_user_error():
    model = tiny_llama()
    with pytest.raises(UserError, match="calibration data"):
        compress(model, [stage(IDENT)])
    assert SEEN == {}


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_activation_quantization_wraps_linears(family):
    model = TINY_MODELS[family]()
    probe = random_windows(2, 24, seed=3)
    before = logits(model, probe)
    act = QuantArgs(bits=8, granularity="token")
    rep = compress(model, [stage("rtn", weights=None, activations=act)])
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}
    assert len(wrapped) == 14 and all(n.startswith("model.layers.") for n in wrapped)
    assert isinstance(model.lm_head, nn.Linear)
    assert all(m.args == act for m in wrapped.values())
    assert all(v["activations"] == act.describe() and v["weights"] is None for v in rep.layers.values())
    # a wrapped linear multiplies per-token 8-bit fake-quantized inputs with its weight
    lin = next(iter(wrapped.values()))
    x = torch.randn(2, 5, lin.in_features) * torch.linspace(0.1, 10, 5).view(1, 5, 1)
    s = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.clamp(torch.round(x / s), -128, 127) * s
    with torch.no_grad():
        torch.testing.assert_close(lin(x), nn.functional.linear(xq, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(lin(x), lin.linear(x), rtol=0, atol=1e-6)
    after = logits(model, probe)
    assert not torch.equal(after, before)
    rel = rel_err(after, before)
    assert 0 < rel < 0.02, float(rel)
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9


def test_weight_and_activation_quantization_together():
    model = tiny_llama()
    w = QuantArgs(bits=8, granularity="channel")
    expect = {n: quantize_weight(m.weight.data.clone(), w, n)[0] for n, m in _block_linears(model).items()}
    rep = compress(model, [stage("rtn", weights=w, activations=QuantArgs(bits=8, granularity="token"))])
    for n, e in expect.items():
        m = dict(model.named_modules())[n]
        assert isinstance(m, ActQuantLinear) and torch.equal(m.weight, e)
    k = {n: (m.in_features, m.out_features) for n, m in ((n, dict(model.named_modules())[n]) for n in expect)}
    bpw = sum(i * o * (8 + 16 / i) for i, o in k.values()) / sum(i * o for i, o in k.values())
    assert abs(rep.bits_per_weight - bpw) < 1e-9


@pytest.mark.parametrize("d", [5, 1023, 1024, 1537, 2100])
def test_gram_equals_the_full_product(d):
    from llmpress.calib.accumulators import HessianAccumulator, gram

    x = torch.randn(64, d, dtype=torch.float64)
    assert torch.allclose(gram(x, split_at=16), x.T @ x, rtol=1e-10, atol=1e-9)  # recursion at every level
    assert torch.allclose(gram(x), x.T @ x, rtol=1e-10, atol=1e-9)
    acc = HessianAccumulator()
    acc.add(x[:40].float())
    acc.add(x[40:].float())
    ref = 2.0 / 64 * (x.T @ x)
    assert torch.allclose(acc.result().double(), ref, rtol=1e-4, atol=1e-4)
