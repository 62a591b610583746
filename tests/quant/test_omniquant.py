"""OmniQuant (learnable weight clipping + learnable equivalent transformations, per block):
clipping never widens beyond min-max, the learned block beats round-to-nearest on a tiny
llama with planted outlier channels (and LET helps under 4-bit activations), determinism,
bad options, presets, packed save/reload, and composition after a QuaRot rotation."""

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama, tiny_tokenizer
from helpers import QUIET

import llmpress
from llmpress import RecipeError, UserError, api, compress, load_recipe, stage
from llmpress.quant import QuantArgs, compute_qparams, dequantize, quantize
from llmpress.quant.omniquant import ClipQuant, OmniQuant

W3G32 = QuantArgs(bits=3, group_size=32)
ASYM = QuantArgs(bits=4, group_size=32, symmetric=False)
A4 = QuantArgs(bits=4, granularity="token")


def planted(seed: int = 0):
    """Tiny llama whose norms blow up three channels each: activation outlier channels at
    the inputs of q/k/v and gate/up."""
    m = tiny_llama(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(64, generator=g)[:3]] *= 25.0
    return m


def _notes(rep):
    return {n: r.notes["omniquant"] for n, r in rep.result.records.items()}


@pytest.mark.parametrize(
    "args", [W3G32, ASYM, QuantArgs(bits=4, group_size=32, full_range=True), QuantArgs(bits=4, group_size=32, scale_dtype="float16")]
)
def test_learned_clipping_never_widens_beyond_min_max(args):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    q = ClipQuant(w, args, learn=True)
    with torch.no_grad():  # logits anywhere, even very large: the factors stay below 1
        for p in q.params():
            p.copy_(torch.randn(p.shape, generator=g) * 6.0 + 2.0)
    wq, qp = q.hard(w)
    rtn = compute_qparams(w, args)
    assert torch.all(qp.scale <= rtn.scale)
    gamma, beta = q.factors()
    assert torch.all(gamma < 1) and torch.all(beta < 1)
    assert (qp.scale < rtn.scale).float().mean() > 0.5
    # the represented range lies inside the min-max grid's range (up to the zero point's rounding, half a step)
    lo_grid = qp.scale * (args.qmin - (0 if qp.zero_point is None else qp.zero_point))
    hi_grid = qp.scale * (args.qmax - (0 if qp.zero_point is None else qp.zero_point))
    lo_rtn = rtn.scale * (args.qmin - (0 if rtn.zero_point is None else rtn.zero_point))
    hi_rtn = rtn.scale * (args.qmax - (0 if rtn.zero_point is None else rtn.zero_point))
    tol = 0.5 * (qp.scale + rtn.scale) if qp.zero_point is not None else 1e-6
    assert torch.all(hi_grid <= hi_rtn + tol) and torch.all(lo_grid >= lo_rtn - tol)
    # the weight is exactly on the grid of its qparams; soft equals hard where the scale is not rounded
    codes = quantize(wq, qp, args)
    assert torch.equal(dequantize(codes, qp, args), wq)
    if args.scale_dtype == "float32":
        assert torch.allclose(q.soft(w).detach(), wq, atol=1e-5)


def test_without_lwc_the_grid_is_min_max():
    w = torch.randn(8, 64)
    q = ClipQuant(w, W3G32, learn=False)
    assert q.params() == [] and torch.equal(q.hard(w)[1].scale, compute_qparams(w, W3G32).scale)


@pytest.mark.parametrize("args", [W3G32, ASYM])
def test_beats_round_to_nearest_on_planted_outliers(args):
    rep = compress(planted(), stage("omniquant", weights=args, iters=100), data=random_windows(8, 32), engine=QUIET)
    notes = _notes(rep)
    assert len(notes) == 14
    for n in notes.values():
        assert not n["kept_rtn"] and n["block_mse"] < 0.5 * n["block_mse_rtn"]
    assert notes["model.layers.0.self_attn.q_proj"]["let"] == ["input_layernorm->q_proj/k_proj/v_proj"]
    assert notes["model.layers.0.mlp.up_proj"]["let"] == ["post_attention_layernorm->gate_proj/up_proj", "mlp.up_proj->down_proj"]


def test_let_helps_under_four_bit_activations():
    data = random_windows(8, 32)
    errs = {}
    for let in (True, False):
        rep = compress(planted(), stage("omniquant", weights=W3G32, activations=A4, iters=100, let=let), data=data, engine=QUIET)
        n = _notes(rep)["model.layers.0.self_attn.q_proj"]
        errs[let] = n["block_mse"] / n["block_mse_rtn"]
    assert errs[True] < 0.7 * errs[False] and errs[True] < 0.4


def test_deterministic():
    ws = []
    for _ in range(2):
        m = planted()
        compress(m, stage("omniquant", weights=W3G32, activations=A4, shift=True, iters=20), data=random_windows(8, 32), engine=QUIET)
        ws.append({n: p.detach().clone() for n, p in m.named_parameters()})
    assert ws[0].keys() == ws[1].keys() and all(torch.equal(ws[0][k], ws[1][k]) for k in ws[0])


def test_keeps_round_to_nearest_when_learning_loses():
    m = tiny_llama()
    rep = compress(
        m, stage("omniquant", weights=W3G32, iters=3, lr=50.0, let_lr=5.0, keep_best=False, shift=True), data=random_windows(8, 32), engine=QUIET
    )
    ref = tiny_llama()
    for name, n in _notes(rep).items():
        assert n["kept_rtn"] and n["block_mse"] == n["block_mse_rtn"]
        w = dict(m.named_modules())[name].weight
        want = dict(ref.named_modules())[name].weight
        assert torch.equal(w, dequantize(quantize(want, compute_qparams(want, W3G32), W3G32), compute_qparams(want, W3G32), W3G32))
    assert not any(type(mod).__name__ == "NormShift" for mod in m.modules())  # the shift structure is undone
    assert m.model.layers[0].self_attn.q_proj.bias is None


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": -1e-3}, "lr=-0.001"),
        ({"let_lr": 0}, "let_lr=0"),
        ({"iters": 0}, "iters=0"),
        ({"windows_per_step": 0}, "windows_per_step=0"),
        ({"lwc": False, "let": False}, "nothing to learn"),
        ({"let_alpha": 1.5}, "let_alpha"),
        ({"lwc": "yes"}, "lwc="),
        ({"weights": QuantArgs(observer="mse")}, "observer"),
        ({"weights": QuantArgs(kind="ternary")}, "integer grids"),
        ({"activations": QuantArgs(bits=8, granularity="channel")}, "per token"),
        ({"batches": 0}, "batches=0"),
    ],
)
def test_bad_options(fields, fragment):
    with pytest.raises(RecipeError, match=fragment):
        OmniQuant(**fields)
    with pytest.raises(RecipeError, match=fragment.split("=")[0]):
        stage("omniquant", **fields)


def test_group_size_must_divide():
    with pytest.raises(UserError, match="group_size 48"):
        ClipQuant(torch.ones(2, 64), QuantArgs(group_size=48), learn=True)


def test_presets_parse():
    for name, bits in (("omniquant-w4g64", 4), ("omniquant-w3g64", 3)):
        cfg = load_recipe(name).stages[0].config
        assert isinstance(cfg, OmniQuant) and cfg.weights.bits == bits and cfg.weights.group_size == 64 and cfg.activations is None
    stages = load_recipe("omniquant-w4a8").stages
    assert stages[0].config.activations.bits == 8 and stages[0].config.weights.bits == 4


@pytest.mark.parametrize(
    ("make", "kw"),
    [(tiny_llama, {"weights": W3G32}), (tiny_gemma3, {"weights": ASYM}), (tiny_llama, {"weights": ASYM, "activations": A4, "shift": True})],
)
def test_tiny_model_compresses_saves_and_reloads(tmp_path, make, kw):
    m = make()
    rep = compress(m, stage("omniquant", iters=30, **kw), data=random_windows(8, 32), engine=QUIET)
    recs = rep.result.records
    assert len(recs) == 14 and all(r.weight_args == kw["weights"] for r in recs.values())
    assert all((r.act_args is not None) == ("activations" in kw) for r in recs.values())
    ids = random_windows(2, 24, seed=3)
    with torch.no_grad():
        want = m(ids).logits
    out = api.save(m, tiny_tokenizer(), tmp_path / "ck", report=rep)
    loaded, _ = llmpress.load_compressed(str(out), backend="dequant")
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(loaded.llmpress_records[name].qparams.scale, recs[name].qparams.scale)


def test_after_quarot_w4a4(tmp_path):
    """Composed after QuaRot (online rotations of the norm outputs, the attention output and
    the down_proj input): LET has no usable group left, LWC still learns, RTN is beaten."""
    m = tiny_llama()
    recipe = [
        stage("quarot", rotation="random_hadamard", residual="online"),
        stage(
            "kv_quant", keys=QuantArgs(bits=4, symmetric=False, granularity="token"), values=QuantArgs(bits=4, symmetric=False, granularity="token")
        ),
        stage("omniquant", targets=["Linear"], ignore=["lm_head"], weights=QuantArgs(bits=4, group_size=32), activations=A4, iters=40),
    ]
    rep = compress(m, recipe, data=random_windows(8, 32), engine=QUIET)
    notes = _notes(rep)
    assert len(notes) == 14
    assert all(n["let"] == [] and "input_layernorm" in n["let_skipped_rotated"] for n in notes.values())
    assert all(n["block_mse"] <= n["block_mse_rtn"] for n in notes.values()) and any(not n["kept_rtn"] for n in notes.values())
    ids = random_windows(2, 24, seed=3)
    with torch.no_grad():
        want = m(ids).logits
    out = api.save(m, tiny_tokenizer(), tmp_path / "ck", report=rep)
    loaded, _ = llmpress.load_compressed(str(out), backend="dequant")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, want, atol=1e-4 * float(want.abs().max()))


def test_bfloat16_model_keeps_its_dtype_and_learns():
    m = planted().to(torch.bfloat16)
    rep = compress(m, stage("omniquant", weights=W3G32, activations=A4, shift=None, iters=30), data=random_windows(8, 32), engine=QUIET)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    notes = _notes(rep)
    assert all(n["block_mse"] < n["block_mse_rtn"] for n in notes.values())
    assert m.model.layers[0].self_attn.q_proj.bias is not None  # shift: null = on with activations


def test_bfloat16_steps_learn_and_auto_follows_the_hardware():
    """amp: true runs the steps (and the comparison with RTN) under bfloat16 autocast: other
    errors than float32's, still far below round-to-nearest; auto is on where bfloat16 is native."""
    from llmpress.quant.block_recon import native_bf16

    data, runs = random_windows(8, 32), {}
    for amp in (True, False, "auto"):
        rep = compress(planted(), stage("omniquant", weights=W3G32, iters=60, amp=amp), data=data, engine=QUIET)
        runs[amp] = _notes(rep)
    for amp, notes in runs.items():
        want = native_bf16(torch.device("cpu")) if amp == "auto" else amp
        assert {n["bf16_steps"] for n in notes.values()} == {want}
        assert all(not n["kept_rtn"] and n["block_mse"] < 0.6 * n["block_mse_rtn"] for n in notes.values())
    q = "model.layers.0.self_attn.q_proj"
    assert runs[True][q]["block_mse"] != runs[False][q]["block_mse"]  # bfloat16 did run
    assert runs[True][q]["block_mse"] == pytest.approx(runs[False][q]["block_mse"], rel=0.5)
    with pytest.raises(RecipeError, match="amp="):
        OmniQuant(amp="yes")


def test_resume_refused_only_with_shifts():
    from llmpress.calib.resume import check_resumable
    from llmpress.recipe import Recipe

    check_resumable(Recipe(stages=(stage("omniquant"),)))
    check_resumable(Recipe(stages=(stage("omniquant", activations=A4),)))  # scales only: the block's tensors say it all
    for kw in ({"shift": True}, {"shift": None, "activations": A4}):
        with pytest.raises(UserError, match="omniquant's shifts"):
            check_resumable(Recipe(stages=(stage("omniquant", **kw),)))
