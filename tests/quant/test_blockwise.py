"""Block-wise reconstruction (AutoRound-style): the learned block beats round-to-nearest on
its output, codes on the grid, clipping never widens, determinism, bad input, and a tiny
model compressed, saved packed and reloaded to the same logits."""

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama, tiny_tokenizer
from helpers import QUIET

import llmpress
from llmpress import RecipeError, UserError, api, compress, load_recipe, stage
from llmpress.quant import QuantArgs, compute_qparams, dequantize, quantize, quantize_weight
from llmpress.quant.blockwise import Blockwise, BlockwiseOptions, LearnedQuant, block_error, learn_block, slice_call
from llmpress.recipe import Recipe

W3G32 = QuantArgs(bits=3, group_size=32)
ASYM = QuantArgs(bits=3, group_size=32, symmetric=False)


def _block_calls(model, index=0, n=8, seqlen=32, batch=4):
    """Inputs, call arguments and full-precision outputs of block ``index`` per batch."""
    block = model.model.layers[index]
    xs, calls, ys = [], [], []

    def pre(_m, args, kwargs):
        xs.append(args[0].detach())
        calls.append((tuple(args[1:]), dict(kwargs)))

    def post(_m, _a, _k, out):
        ys.append((out[0] if isinstance(out, tuple) else out).detach())

    h1 = block.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = block.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in random_windows(n, seqlen).split(batch):
                model(input_ids=ids, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    return block, xs, calls, ys


def _quants(block, args, learn_clip=True):
    return {n: LearnedQuant(m.weight.data, args, learn_clip=learn_clip, name=n) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("args", [W3G32, ASYM])
def test_learned_block_beats_round_to_nearest(make, args):
    torch.manual_seed(0)
    block, xs, calls, ys = _block_calls(make())
    quants = _quants(block, args)
    res = learn_block(block, quants, xs, calls, ys, BlockwiseOptions(iters=80, lr=0.02, windows_per_step=2, amp=False))
    assert not res.kept_rtn and len(res.losses) == 80
    # RTN on the same block, computed independently of the quantizers
    rtn = {f"{n}.weight": quantize_weight(m.weight.data, args)[0] for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        outs = [torch.func.functional_call(block, rtn, (x, *a), k) for x, (a, k) in zip(xs, calls)]
        e_rtn = sum(float(((o[0] if isinstance(o, tuple) else o) - y).pow(2).sum()) for o, y in zip(outs, ys))
    e_rtn /= sum(y.numel() for y in ys)
    assert res.error_rtn == pytest.approx(e_rtn, rel=1e-4)
    assert res.error == pytest.approx(block_error(block, quants, xs, calls, ys))
    assert res.error < 0.85 * e_rtn


def test_bfloat16_steps_still_learn_and_auto_follows_the_hardware():
    """amp: true runs the steps' matmuls in bfloat16 (the losses differ from float32's) and
    still beats nearest rounding by the float32 measure; auto is on exactly where bfloat16
    is native."""
    from llmpress.quant.block_recon import autocast_for, native_bf16

    torch.manual_seed(0)
    block, xs, calls, ys = _block_calls(tiny_llama())
    runs = {}
    for amp in (True, False):
        quants = _quants(block, W3G32)
        runs[amp] = learn_block(block, quants, xs, calls, ys, BlockwiseOptions(iters=40, lr=0.02, windows_per_step=2, amp=amp))
    assert runs[True].losses[0] != runs[False].losses[0]  # bfloat16 did run
    assert runs[True].losses[0] == pytest.approx(runs[False].losses[0], rel=0.05)
    assert not runs[True].kept_rtn and runs[True].error < 0.9 * runs[True].error_rtn
    cpu = torch.device("cpu")
    assert autocast_for(True, cpu).fast_dtype == torch.bfloat16 and autocast_for(True, cpu)._enabled
    assert not autocast_for(False, cpu)._enabled
    assert autocast_for("auto", cpu)._enabled == native_bf16(cpu)


@pytest.mark.parametrize(
    "args", [W3G32, ASYM, QuantArgs(bits=4, group_size=32, full_range=True), QuantArgs(bits=4, group_size=32, scale_dtype="float16")]
)
def test_codes_on_grid_and_clipping_never_widens(args):
    block, xs, calls, ys = _block_calls(tiny_llama())
    quants = _quants(block, args)
    # a large clipping step: the factors would leave [clip_min, 1] without the projection
    learn_block(block, quants, xs, calls, ys, BlockwiseOptions(iters=30, lr=0.05, clip_lr=0.2, clip_min=0.6, keep_best=False))
    narrowed = 0
    for n, q in quants.items():
        w, qp, codes = q.hard()
        # the weight is exactly on the grid of its qparams, codes in range
        assert torch.equal(quantize(w, qp, args), codes.reshape(w.shape))
        assert torch.equal(dequantize(codes.reshape(w.shape), qp, args), w)
        assert float(codes.min()) >= args.qmin and float(codes.max()) <= args.qmax
        a, b = q.clip_factors()
        assert float(torch.minimum(a, b).min()) >= 0.6 and float(torch.maximum(a, b).max()) <= 1.0
        # never wider than min-max: every scale at most the min-max grid's
        ref = compute_qparams(dict(block.named_modules())[n].weight.data, args)
        assert (qp.scale <= ref.scale * (1 + 1e-6)).all()
        narrowed += int((qp.scale < ref.scale * (1 - 1e-3)).sum())
    assert narrowed > 0


def test_deterministic():
    runs = []
    for _ in range(2):
        block, xs, calls, ys = _block_calls(tiny_llama())
        quants = _quants(block, W3G32)
        learn_block(block, quants, xs, calls, ys, BlockwiseOptions(iters=20))
        runs.append({n: q.hard() for n, q in quants.items()})
    for n in runs[0]:
        assert torch.equal(runs[0][n][0], runs[1][n][0]) and torch.equal(runs[0][n][1].scale, runs[1][n][1].scale)


def test_keeps_round_to_nearest_when_learning_loses():
    block, xs, calls, ys = _block_calls(tiny_llama())
    quants = _quants(block, W3G32)
    # huge steps with every step kept: V ends at the bounds
    res = learn_block(block, quants, xs, calls, ys, BlockwiseOptions(iters=3, lr=10.0, keep_best=False))
    assert res.kept_rtn and res.error == res.error_rtn
    for n, q in quants.items():
        w, _, _ = q.hard()
        assert torch.equal(w, quantize_weight(dict(block.named_modules())[n].weight.data, W3G32)[0])


@pytest.mark.parametrize("args", [QuantArgs(bits=4, group_size=16, full_range=True), QuantArgs(bits=2, group_size=16)])
@pytest.mark.parametrize("with_offset", [True, False])
def test_fused_symmetric_fake_quant_matches_the_unfused_expression(args, with_offset):
    """The fused symmetric path gives the value and the straight-through gradients (weights,
    offsets, clipping factors through the scale) of clamp(round(w / s + v)) s written out,
    codes clamped at both ends included."""
    from llmpress.quant.block_recon import ste_fake_quant, ste_round
    from llmpress.quant.core import symmetric_scale

    gen = torch.Generator().manual_seed(0)
    wg = torch.randn(6, 3, 16, generator=gen)
    v0 = torch.rand(wg.shape, generator=gen) - 0.5
    g = torch.randn(wg.shape, generator=gen)
    a0 = 0.6 + 0.4 * torch.rand(6, 3, generator=gen)  # clipped groups: codes beyond the grid get clamped

    def run(fused):
        w, v, a = wg.clone().requires_grad_(True), v0.clone().requires_grad_(True), a0.clone().requires_grad_(True)
        lo, hi = w.amin(-1) * a, w.amax(-1) * a
        off = v if with_offset else 0.0
        if fused:
            out = ste_fake_quant(w, lo, hi, args, off)
        else:
            s = symmetric_scale(lo, hi, args).unsqueeze(-1)
            out = torch.clamp(ste_round(w / s + off), args.qmin, args.qmax) * s
        grads = torch.autograd.grad(out, [w, v, a], g, allow_unused=True)
        return out.detach(), grads

    (o1, g1), (o2, g2) = run(True), run(False)
    assert torch.equal(o1, o2)
    s = symmetric_scale(wg.amin(-1) * a0, wg.amax(-1) * a0, args).unsqueeze(-1)
    assert ((wg / s + v0).round() > args.qmax).any()  # the clamp is exercised
    for x, y in zip(g1, g2):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert g1[2].abs().sum() > 0  # the clipping factors do get a gradient


def test_slice_call_cuts_batch_tensors_only():
    x = torch.randn(4, 5, 8)
    cos, sin = torch.randn(4, 5, 2), torch.randn(1, 5, 2)
    pos = torch.arange(5)
    xs, args, kw = slice_call(x, (), {"position_embeddings": (cos, sin), "cache_position": pos, "attention_mask": None}, 1, 3)
    assert torch.equal(xs, x[1:3]) and args == ()
    assert torch.equal(kw["position_embeddings"][0], cos[1:3]) and kw["position_embeddings"][1] is sin
    assert kw["cache_position"] is pos and kw["attention_mask"] is None


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": -1e-3}, "lr=-0.001"),
        ({"iters": 0}, "iters=0"),
        ({"windows_per_step": 0}, "windows_per_step=0"),
        ({"clip_min": 0.0}, "clip_min"),
        ({"clip_lr": -1.0}, "clip_lr"),
        ({"amp": "yes"}, "amp='yes'"),
        ({"amp": 1}, "amp=1"),
    ],
)
def test_bad_options(fields, fragment):
    with pytest.raises(RecipeError, match=fragment):
        Blockwise(**fields)
    with pytest.raises(UserError, match=fragment):
        BlockwiseOptions(**fields)


def test_bad_recipe_fields():
    with pytest.raises(RecipeError, match="lr"):
        stage("blockwise", lr=0)
    with pytest.raises(RecipeError, match="mode="):
        stage("blockwise", mode="sideways")
    with pytest.raises(RecipeError, match="observer"):
        stage("blockwise", weights=QuantArgs(observer="mse"))
    with pytest.raises(RecipeError, match="integer grids"):
        stage("blockwise", weights=QuantArgs(kind="ternary"))
    with pytest.raises(UserError, match="group_size 48"):
        LearnedQuant(torch.ones(2, 64), QuantArgs(group_size=48), learn_clip=True)


def test_presets_parse():
    for name, bits in (("blockwise-w4g64", 4), ("blockwise-w3g64", 3)):
        cfg = load_recipe(name).stages[0].config
        assert isinstance(cfg, Blockwise) and cfg.weights.bits == bits and cfg.weights.group_size == 64
        assert cfg.mode == "corrective" and cfg.weights.signed_scale and cfg.iters == 100 and cfg.lr == 0.01
        assert cfg.needs_fp_stream


@pytest.mark.parametrize(("make", "args"), [(tiny_llama, W3G32), (tiny_llama, ASYM), (tiny_gemma3, W3G32)])
def test_tiny_model_compresses_saves_and_reloads(tmp_path, make, args):
    m = make()
    rep = compress(m, stage("blockwise", weights=args, iters=40), data=random_windows(8, 32), engine=QUIET)
    recs = rep.result.records
    assert len(recs) == 14
    notes = [r.notes["blockwise"] for r in recs.values()]
    assert all(n["block_mse"] <= n["block_mse_rtn"] for n in notes)
    assert any(n["moved"] > 0 for n in notes)
    from llmpress.quant.block_recon import native_bf16

    assert {n["bf16_steps"] for n in notes} == {native_bf16(torch.device("cpu"))}  # amp: auto
    rtn = make()
    compress(rtn, stage("rtn", weights=args), engine=QUIET)
    name = "model.layers.1.mlp.down_proj"
    q = lambda mod: dict(mod.named_modules())[name].weight  # noqa: E731
    assert not torch.equal(q(m), q(rtn))
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


def _against_sequential(mode: str, args: QuantArgs) -> dict:
    """Tiny llama compressed in ``mode`` and in sequential mode (float32 steps), mode ->
    (model, report); block 0 (same inputs and targets in every mode) has the same codes in
    both, block 1 does not."""
    data = random_windows(8, 32)
    models = {}
    for md in ("sequential", mode):
        m = tiny_llama()
        rep = compress(m, stage("blockwise", weights=args, iters=30, mode=md, amp=False), data=data, engine=QUIET)
        models[md] = (m, rep)
    w = lambda m, n: dict(m.named_modules())[n].weight  # noqa: E731
    seq, other = models["sequential"][0], models[mode][0]
    assert torch.equal(w(seq, "model.layers.0.mlp.down_proj"), w(other, "model.layers.0.mlp.down_proj"))
    assert not torch.equal(w(seq, "model.layers.1.mlp.down_proj"), w(other, "model.layers.1.mlp.down_proj"))
    return models


def test_parallel_mode_learns_on_full_precision_inputs(tmp_path):
    """Parallel: block 1 learns on the full-precision model's block-1 inputs (not the
    compressed block 0's outputs), so its result differs from sequential mode's; block 0,
    whose inputs are the same in both modes, gives the same codes."""
    args = QuantArgs(bits=3, group_size=32)
    models = _against_sequential("parallel", args)
    # block 1's target in parallel mode is the dense model's block-1 output: its RTN error
    # there is measured against the dense stream
    _, xs, calls, ys = _block_calls(tiny_llama(), index=1, n=8, seqlen=32, batch=8)
    notes = models["parallel"][1].result.records["model.layers.1.mlp.down_proj"].notes["blockwise"]
    block = tiny_llama().model.layers[1]
    assert notes["block_mse_rtn"] == pytest.approx(block_error(block, _quants(block, args), xs, calls, ys), rel=1e-4)
    m, rep = models["parallel"]
    ids = random_windows(2, 24, seed=3)
    with torch.no_grad():
        want = m(ids).logits
    out = api.save(m, None, tmp_path / "ck", report=rep)
    loaded, _ = llmpress.load_compressed(str(out), backend="dequant")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_corrective_mode_learns_compressed_inputs_against_the_dense_model():
    """Corrective (AutoRound's): block 1 learns on the compressed block 0's outputs against the
    dense model's block-1 outputs; block 0 (same inputs and targets as sequential) gives the
    same codes as sequential mode, block 1 does not."""
    args = QuantArgs(bits=3, group_size=32)
    models = _against_sequential("corrective", args)
    cor = models["corrective"][0]
    _, xs_c, calls, _ = _block_calls(cor, index=1, n=8, seqlen=32, batch=8)  # block 0 compressed: block 1's inputs
    _, xs_d, _, ys_d = _block_calls(tiny_llama(), index=1, n=8, seqlen=32, batch=8)  # the dense model's
    assert not torch.equal(xs_c[0], xs_d[0])
    block = tiny_llama().model.layers[1]
    notes = models["corrective"][1].result.records["model.layers.1.mlp.down_proj"].notes["blockwise"]
    assert notes["block_mse_rtn"] == pytest.approx(block_error(block, _quants(block, args), xs_c, calls, ys_d), rel=1e-4)
    assert notes["block_mse_rtn"] != pytest.approx(block_error(block, _quants(block, args), xs_d, calls, ys_d), rel=1e-3)
    assert notes["block_mse"] < notes["block_mse_rtn"]


def test_parallel_mode_refuses_resume():
    from llmpress.calib.resume import check_resumable

    with pytest.raises(UserError, match="full-precision stream"):
        check_resumable(load_recipe_from(stage("blockwise", mode="parallel")))
    check_resumable(load_recipe_from(stage("blockwise")))


def load_recipe_from(st):
    return Recipe(stages=(st,))


def test_activations_in_the_loop_are_kept_at_run_time_and_beat_rtn_w4a4(tmp_path):
    """W4A4: the int4 per-token activations are fake-quantized while learning; the result keeps
    them (ActQuantLinear, act_args recorded) and does better on held-out windows than RTN with
    the same activations; the checkpoint reloads to the same outputs."""
    from helpers import rel_err

    from llmpress.runtime.act_quant import ActQuantLinear

    a4 = QuantArgs(bits=4, granularity="token")
    w4 = QuantArgs(bits=4, group_size=32)
    with pytest.raises(RecipeError, match="per token"):
        stage("blockwise", activations=QuantArgs(bits=4, group_size=32))
    ref = tiny_llama()
    ids = random_windows(4, 32, seed=5)
    with torch.no_grad():
        want = ref(ids).logits
    m = tiny_llama()
    rep = compress(m, stage("blockwise", weights=w4, activations=a4, iters=40, mode="corrective"), data=random_windows(8, 32), engine=QUIET)
    rtn = tiny_llama()
    compress(rtn, stage("rtn", weights=w4, activations=a4), engine=QUIET)
    name = "model.layers.1.mlp.down_proj"
    assert isinstance(dict(m.named_modules())[name], ActQuantLinear) and rep.result.records[name].act_args == a4
    with torch.no_grad():
        got, got_rtn = m(ids).logits, rtn(ids).logits
    assert rel_err(got, want) < rel_err(got_rtn, want)
    out = api.save(m, None, tmp_path / "ck", report=rep)
    loaded, _ = llmpress.load_compressed(str(out), backend="dequant")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)


def _bw(targets, bits, **kw):
    return stage("blockwise", targets=targets, ignore=(), weights=QuantArgs(bits=bits, group_size=32, signed_scale=True), iters=10, amp=False, **kw)


def test_joint_runs_group_only_plan_bits_shaped_stages():
    from llmpress.calib.plan import joint_runs

    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    a, b = _bw([q], 3), _bw([k], 4)
    assert [len(r) for r in joint_runs([(0, a), (1, b)])] == [2]
    cases = {
        "overlapping targets": _bw([q, k], 4),
        "a pattern": _bw(["Linear"], 4),
        "another setting": _bw([k], 4, lr=0.02),
        "another method": stage("awq", targets=[k], ignore=(), weights=QuantArgs(bits=4, group_size=32)),
    }
    for why, other in cases.items():
        assert [len(r) for r in joint_runs([(0, a), (1, other)])] == [1, 1], why


BASES = {
    "blockwise": lambda: stage("blockwise", weights=QuantArgs(bits=4, group_size=32, signed_scale=True), iters=20, amp=False),
    "omniquant": lambda: stage("omniquant", weights=QuantArgs(bits=4, group_size=32), iters=10),
}


def test_plan_with_group_sizes_keeps_each_linears_group_size():
    """Candidates that differ in group size as well as bits: the joint block-wise pass gives
    every linear the planned bits and group size, and the scales have that many groups."""
    from llmpress.bitplan import plan_bits

    data = random_windows(8, 32)
    base = Recipe(stages=(BASES["blockwise"](),))
    plan = plan_bits(tiny_llama(), data, base=base, candidates="w2g32,w3g16,w3g32,w4g16,w4g32", budget=3.3)
    assert len({lab[2:] for lab in plan.choice.values()}) == 2  # both group sizes chosen somewhere
    m = tiny_llama()
    rep = compress(m, Recipe.from_yaml(plan.recipe.to_yaml()), data=data, engine=QUIET)
    recs = rep.result.records
    assert {n: f"w{r.weight_args.bits}g{r.weight_args.group_size}" for n, r in recs.items()} == plan.choice
    mods = dict(m.named_modules())
    for n, r in recs.items():
        assert r.qparams.scale.shape[-1] == mods[n].weight.shape[1] // r.weight_args.group_size, n


@pytest.mark.parametrize("method", list(BASES))
def test_plan_bits_stages_learn_together_with_their_own_grids(monkeypatch, method):
    """A plan-bits recipe on a blockwise (omniquant) base: one call per block with every
    target's planned grid (not one pass per setting), records as planned."""
    import dataclasses

    from llmpress.bitplan import plan_bits
    from llmpress.registry import METHODS

    data = random_windows(8, 32)
    base = Recipe(stages=(BASES[method](),))
    plan = plan_bits(tiny_llama(), data, base=base, candidates="w2g32,w3g32,w4g32", budget=3.2)
    recipe = Recipe.from_yaml(plan.recipe.to_yaml())
    assert len(recipe.stages) >= 2 and len(set(plan.choice.values())) >= 2
    calls, orig = [], METHODS[method]

    def spy(ctx, cfg):
        calls.append({loc: g.bits for loc, g in (ctx.grids or {}).items()})
        return orig.apply(ctx, cfg)

    monkeypatch.setitem(METHODS, method, dataclasses.replace(orig, apply=spy))
    m = tiny_llama()
    rep = compress(m, recipe, data=data, engine=QUIET)
    assert len(calls) == 2 and all(len(c) == 7 for c in calls)
    want = {n: int(lab[1]) for n, lab in plan.choice.items()}
    assert {f"model.layers.{i}.{loc}": bits for i, c in enumerate(calls) for loc, bits in c.items()} == want
    recs = rep.result.records
    assert {n: r.weight_args.bits for n, r in recs.items()} == want
    assert all(r.notes[method]["block_mse"] <= r.notes[method]["block_mse_rtn"] for r in recs.values())
    mods = dict(m.named_modules())
    for n, r in recs.items():  # each linear on its own grid: integer codes within that grid's range
        w = mods[n].weight.detach().float()
        codes = w.reshape(w.shape[0], -1, 32) / r.qparams.scale.float().unsqueeze(-1)
        assert torch.allclose(codes, codes.round(), atol=1e-3), n
        assert codes.round().min() >= r.weight_args.qmin and codes.round().max() <= r.weight_args.qmax, n
