"""Low rank (llmpress/lowrank): accounting, SVD / ASVD / SVD-LLM maths, the stored form and its
runtime module, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import TINY_MODELS, random_windows, tiny_llama
from helpers import QUIET, logits

from llmpress import api, compress, load_compressed, stage
from llmpress.errors import LlmpressError, UserError
from llmpress.lowrank.asvd import ASVD, asvd
from llmpress.lowrank.core import (
    break_even_rank,
    output_error,
    rank_for_ratio,
    refit_left,
    scaled_factors,
    svd_factors,
    whitened_factors,
    whitening_factor,
)
from llmpress.lowrank.svd_llm import SVDLLM, svd_llm
from llmpress.registry import ModuleContext, ModuleRecord
from llmpress.runtime.lowrank import LowRankLinear


def _problem(m=12, n=16, tokens=64, seed=0, dead: int | None = None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, n, dtype=torch.float64)
    if dead is not None:
        X[:, dead] = 0
    return W, X, X.T @ X


def test_accounting_break_even_and_ratio():
    # parameters mn -> r(m + n); break-even at mn / (m + n)
    assert break_even_rank(576, 576) == 288
    assert rank_for_ratio(576, 1536, 0.8) == int(0.8 * 576 * 1536 // (576 + 1536))
    r = rank_for_ratio(576, 1536, 0.5)
    assert r * (576 + 1536) <= 0.5 * 576 * 1536 < (r + 1) * (576 + 1536)
    with pytest.raises(UserError, match="would not save parameters"):
        rank_for_ratio(576, 576, 1.0)  # r = 288 stores exactly mn
    with pytest.raises(UserError, match=r"must be in \(0, 1\]"):
        rank_for_ratio(8, 8, 0.0)
    with pytest.raises(UserError, match="rank 1 or more"):
        rank_for_ratio(8, 8, 0.05)


def test_svd_is_the_best_frobenius_truncation():
    W, _, _ = _problem()
    A, B, S = svd_factors(W, 5)
    err = float(((W - A @ B) ** 2).sum())
    assert err == pytest.approx(float((S[5:] ** 2).sum()), rel=1e-10)
    # sqrt(S) in each factor: the factors are balanced
    assert torch.allclose(A.norm(dim=0), B.norm(dim=1), rtol=1e-10)


def test_whitening_makes_each_dropped_value_its_output_error():
    W, X, H = _problem()
    wh = whitening_factor(H)
    assert wh.shift == 0.0
    for r in (1, 4, 7):
        A, B, S = whitened_factors(W, wh.L, r)
        direct = float(((X @ (W - A @ B).T) ** 2).sum())  # ||X (W - A B)^T||^2 on the tokens themselves
        assert direct == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-8)
        assert output_error(W, A, B, H) == pytest.approx(direct, rel=1e-8)
        # no rank-r factorization does better on these tokens: not plain SVD, not a refit
        a2, b2, _ = svd_factors(W, r)
        assert output_error(W, a2, b2, H) > direct
        assert output_error(W, refit_left(W, B, H), B, H) == pytest.approx(direct, rel=1e-8)


def test_refit_lowers_the_error_of_any_right_factor():
    W, _, H = _problem(seed=3)
    A, B, _ = svd_factors(W, 4)
    assert output_error(W, refit_left(W, B, H), B, H) < output_error(W, A, B, H)


def test_asvd_alpha_zero_is_svd_and_search_never_worse():
    W, X, H = _problem(seed=1)
    a0, b0 = scaled_factors(W, X.abs().mean(0) ** 0.0, 5)
    a, b, _ = svd_factors(W, 5)
    assert torch.allclose(a0 @ b0, a @ b, atol=1e-12)

    def run(cfg):
        lin = nn.Linear(16, 12, bias=False)
        lin.weight.data = W.float().clone()
        rec = ModuleRecord(name="l", out_features=12, in_features=16)
        stats = {"channel_stats": {"mean_abs": X.abs().mean(0).float()}, "hessian": H.float()}
        asvd(ModuleContext(name="l", module=lin, stats=stats, record=rec), cfg)
        return rec, lin

    plain, _ = run(ASVD(rank=5, alpha=0.0))
    searched, lin = run(ASVD(rank=5))
    assert searched.notes["output_error"] <= plain.notes["output_error"]
    assert searched.form == "lowrank" and torch.equal(searched.payload["A"] @ searched.payload["B"], lin.weight.data)


def test_svd_llm_shifts_a_singular_gram_and_reports_it():
    W, X, H = _problem(dead=3)
    lin = nn.Linear(16, 12, bias=False)
    lin.weight.data = W.float().clone()
    rec = ModuleRecord(name="l", out_features=12, in_features=16)
    svd_llm(ModuleContext(name="l", module=lin, stats={"hessian": H.float()}, record=rec), SVDLLM(rank=6))
    assert rec.notes["whitening_shift"] > 0
    assert torch.isfinite(rec.payload["A"]).all() and torch.isfinite(rec.payload["B"]).all()
    # the dead channel sees no data: the error on the tokens is still the (near-)optimal one
    best = output_error(W, *whitened_factors(W, whitening_factor(H + 1e-9 * torch.eye(16, dtype=H.dtype)).L, 6)[:2], H)
    assert rec.notes["output_error"] <= best * (1 + 1e-4)


@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm"])
def test_compress_save_load_serves_two_matmuls(tmp_path, method):
    model = tiny_llama()
    ids = random_windows(8, 32)
    rep = compress(model, [stage(method, targets=["Linear"], ignore=["lm_head"], ratio=0.5)], data=ids, engine=QUIET)
    recs = rep.result.records
    q = recs["model.layers.0.self_attn.q_proj"]
    m, n = q.out_features, q.in_features
    r = q.notes["rank"]
    assert r == rank_for_ratio(m, n, 0.5)
    assert q.bits_per_weight() == pytest.approx(16 * r * (m + n) / (m * n))
    expected = logits(model, ids[:2])
    api.save(model, None, tmp_path / "c", report=rep)
    back, _ = load_compressed(str(tmp_path / "c"))
    mod = back.model.layers[0].self_attn.q_proj
    assert isinstance(mod, LowRankLinear) and (mod.rank, mod.out_features, mod.in_features) == (r, m, n)
    assert torch.allclose(logits(back, ids[:2]), expected, atol=1e-4, rtol=1e-4)


def test_rank_too_large_is_refused_before_anything_changes():
    model = tiny_llama()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(LlmpressError, match="would not save parameters"):
        compress(model, [stage("svd", targets=["Linear"], ignore=["lm_head"], rank=10_000)], engine=QUIET)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_a_stage_after_factoring_is_refused_before_anything_changes():
    model = tiny_llama()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(LlmpressError, match=r"stage 1 \(rtn\) after stage 0 \(svd\).*not in llmpress yet"):
        compress(model, [stage("svd", targets=["Linear"], ignore=["lm_head"], ratio=0.5), stage("rtn", targets=["Linear"], ignore=["lm_head"])],
                 engine=QUIET)  # fmt: skip
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_quantized_then_factored_is_allowed_and_stored_as_factors(tmp_path):
    model = tiny_llama()
    rep = compress(model, [stage("rtn", targets=["Linear"], ignore=["lm_head"]), stage("svd", targets=["Linear"], ignore=["lm_head"], ratio=0.5)],
                   engine=QUIET)  # fmt: skip
    api.save(model, None, tmp_path / "c", report=rep)
    back, _ = load_compressed(str(tmp_path / "c"))
    assert isinstance(back.model.layers[1].mlp.down_proj, LowRankLinear)


def test_qkv_accounting_matches_the_seeds():
    from llmpress.lowrank.core import qkv_costs, qsvd_ratios

    E, L, r = 4096, 32, 512
    c = qkv_costs(E, E, E, r, L)
    assert (c["separate"]["params"], c["separate"]["macs"], c["separate"]["cache"]) == (6 * L * r * E, 6 * r * E, 2 * r * L)
    assert (c["joint"]["params"], c["joint"]["macs"], c["joint"]["cache"]) == (4 * L * r * E, 4 * r * E, r * L)
    # the QSVD-noQ cells: R1 = 4r/(3E) -> R2 = r/(2E) = 0.375 R1
    for r1, r2 in ((1.0, 37.5), (0.9, 33.75), (0.8, 30), (0.7, 26.25), (0.6, 22.5), (0.533, 20), (0.467, 17.5), (0.4, 15)):
        R1, R2 = qsvd_ratios(E, E, E, r1 * 3 * E / 4)  # the rank giving that parameter ratio
        assert R1 == pytest.approx(r1) and 100 * R2 == pytest.approx(r2, abs=0.02)
    R1, R2 = qsvd_ratios(E, E, E, 768)
    assert R1 == pytest.approx(4 * 768 / (3 * E)) and R2 == pytest.approx(0.375 * R1)
    # grouped-query attention (SmolLM2-135M: 9 query heads, 3 key/value heads of 64): the general formula
    R1, R2 = qsvd_ratios(576, 576, 192, 96)
    assert R1 == pytest.approx(96 * (576 + 960) / (576 * 960)) and R2 == pytest.approx(96 / 384)


def test_allocation_spends_the_budget_and_favours_important_layers():
    from llmpress.lowrank.allocate import allocate

    shapes = {"a": (64, 64), "b": (64, 64), "c": (32, 96)}
    scores = {"a": torch.linspace(10, 1, 64).double(), "b": torch.linspace(1, 0.1, 64).double(), "c": torch.linspace(5, 0.5, 32).double()}
    total = sum(m * n for m, n in shapes.values())
    for ratio in (0.2, 0.5, 0.8):
        ranks = allocate(scores, shapes, ratio)
        spent = sum(r * sum(shapes[k]) for k, r in ranks.items())
        assert spent <= ratio * total
        # nothing that still fits was left: every layer below its cap costs more than what is left
        left = ratio * total - spent
        caps = {k: -(-m * n // (m + n)) - 1 for k, (m, n) in shapes.items()}
        assert all(ranks[k] == caps[k] or sum(shapes[k]) > left for k in shapes), (ranks, left)
        assert all(1 <= ranks[k] <= caps[k] for k in shapes)
    ranks = allocate(scores, shapes, 0.4)
    assert ranks["a"] > ranks["b"]


def test_proportional_allocation_shares_the_budget_by_importance():
    """The seeds' QSVD rule: each layer's parameters in proportion to its summed scores, a layer
    past its break-even rank capped and its excess shared by the others, within the budget."""
    from llmpress.lowrank.allocate import allocate_proportional

    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 64)}
    scores = {"a": torch.full((64,), 3.0).double(), "b": torch.full((64,), 1.0).double(), "c": torch.full((64,), 0.0).double()}
    ranks = allocate_proportional(scores, shapes, 0.3)  # 0.3 * 3 * 4096 = 28.8 ranks of 128: 1 each, then 25.8 shared 3:1:0
    assert ranks == {"a": 1 + 19, "b": 1 + 6, "c": 1}
    ranks = allocate_proportional(scores, shapes, 0.6)  # a's share (1 + 42.6 ranks) passes its cap of 31
    assert ranks["a"] == 31 and ranks["b"] == 1 + int(0.6 * 3 * 32 - 3 - 30) and ranks["c"] == 1
    for ratio in (0.1, 0.5, 0.9):
        r = allocate_proportional(scores, shapes, ratio)
        assert sum(v * 128 for v in r.values()) <= ratio * 3 * 4096  # within the budget
        assert all(1 <= v <= 31 for v in r.values())


def test_singular_value_gradients_are_the_reparametrized_ones():
    from llmpress.lowrank.allocate import LowRankAlloc, singular_value_grads

    model = tiny_llama()
    ids = random_windows(2, 16)
    name = "model.layers.1.mlp.down_proj"
    ((S, g),) = singular_value_grads(model, {name: [name]}, ids, LowRankAlloc(windows=2, batch_size=2)).values()
    lin = model.model.layers[1].mlp.down_proj
    U, S2, Vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
    s = S2.clone().requires_grad_(True)
    w0 = lin.weight.data.clone()
    del lin.weight
    lin.weight = (U * s) @ Vh  # W as a function of its singular values
    lin.weight = lin.weight.float()
    logits_ = model(input_ids=ids, use_cache=False).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits_.reshape(-1, logits_.shape[-1]), ids[:, 1:].reshape(-1))
    (gs,) = torch.autograd.grad(loss, s)
    assert torch.allclose(g, gs.abs(), rtol=1e-3, atol=1e-7)
    assert torch.allclose(S, S2) and w0.shape == (64, 128)


def test_allocated_ranks_reach_the_factor_stage(tmp_path):
    model = tiny_llama()
    ids = random_windows(8, 32)
    recipe = [stage("lowrank_alloc", targets=["Linear"], ignore=["lm_head"], ratio=0.5, windows=4),
              stage("svd_llm", targets=["Linear"], ignore=["lm_head"])]  # fmt: skip
    rep = compress(model, recipe, data=ids, engine=QUIET)
    (summary,) = rep.result.stages.values()
    recs = rep.result.records
    assert {n: r.notes["rank"] for n, r in recs.items()} == summary["ranks"]
    total = sum(r.out_features * r.in_features for r in recs.values())
    spent = sum(r.notes["rank"] * (r.out_features + r.in_features) for r in recs.values())
    assert 0.5 * total - max(r.out_features + r.in_features for r in recs.values()) < spent <= 0.5 * total
    assert len(set(summary["ranks"].values())) > 1  # not uniform


def test_qsvd_one_shared_right_factor_stored_once(tmp_path):
    from llmpress.export.packed import checkpoint_accounting
    from llmpress.export.packed_load import read_manifest

    model = tiny_llama()
    ids = random_windows(8, 32)
    attn = model.model.layers[0].self_attn
    W = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().double().clone()
    rep = compress(model, "qsvd-80", data=ids, engine=QUIET)
    recs = rep.result.records
    q, k, v = (recs[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q.payload["B"] is k.payload["B"] is v.payload["B"]
    m, n = W.shape
    r = q.notes["joint_rank"]
    assert r == rank_for_ratio(m, n, 0.8)
    A = torch.cat([q.payload["A"], k.payload["A"], v.payload["A"]]).double()
    # the model now holds the stacked product; a rank-r matrix, not the original weight
    now = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().double()
    assert torch.allclose(now, A @ q.payload["B"].double(), atol=1e-6)
    assert int(torch.linalg.matrix_rank(now, rtol=1e-5)) == r < int(torch.linalg.matrix_rank(W, rtol=1e-5))
    # B counted once: the three layers' bits add up to r(m + n) numbers at 16 bits
    total_bits = sum(x.bits_per_weight() * x.out_features * x.in_features for x in (q, k, v))
    assert total_bits == pytest.approx(16 * r * (m + n))
    expected = logits(model, ids[:2])
    api.save(model, None, tmp_path / "c", report=rep)
    meta = read_manifest(tmp_path / "c")
    assert "model.layers.0.self_attn.k_proj.B" not in meta["tensors"] and "model.layers.0.self_attn.q_proj.B" in meta["tensors"]
    assert meta["layers"]["model.layers.0.self_attn.v_proj"]["meta"]["shared"] == {"B": "model.layers.0.self_attn.q_proj"}
    acc = checkpoint_accounting(meta)
    assert acc["compressed_linear_bytes"] == sum(4 * numel for numel in [r * (m + n)] * 2)  # two blocks, float32 factors
    back, _ = load_compressed(str(tmp_path / "c"))
    a = back.model.layers[0].self_attn
    assert isinstance(a.k_proj, LowRankLinear) and a.k_proj.B.data_ptr() == a.q_proj.B.data_ptr()
    assert torch.allclose(logits(back, ids[:2]), expected, atol=1e-4, rtol=1e-4)


def test_qsvd_with_a_module_stage_on_qkv_is_refused():
    with pytest.raises(LlmpressError, match=r"block-scope stages run first"):
        compress(tiny_llama(), [stage("qsvd", targets=["re:.*self_attn\\.(q|k|v)_proj$"], ratio=0.8), stage("rtn", targets=["Linear"], ignore=["lm_head"])],
                 data=random_windows(4, 16), engine=QUIET)  # fmt: skip


def test_qsvd_needs_all_three_projections():
    with pytest.raises(LlmpressError, match="factors q, k and v together"):
        compress(tiny_llama(), [stage("qsvd", targets=["re:.*self_attn\\.(q|k)_proj$"], ratio=0.8)], data=random_windows(4, 16), engine=QUIET)


@pytest.mark.parametrize("family", ["llama", "llama-bias", "gemma3"])
def test_qsvd_latent_cache_decodes_as_the_factored_model(tmp_path, family):
    """The loaded QSVD checkpoint caches the r-number latent instead of K and V; greedy decoding
    gives the tokens and (to float rounding) the logits of the same factors without the latent cache
    (decode steps take the values through the attention as latents, prefill rebuilds them).
    Biased q/k/v (Qwen2-like); Gemma 3: head norms on the rebuilt keys, two rotary tables, and a
    prompt longer than the sliding window (16) so the local layer's cache drops latents and its
    keys' positions shift."""
    from transformers import DynamicCache

    from llmpress.runtime.latent_kv import LatentKVAttention

    model = tiny_llama(attention_bias=True) if family == "llama-bias" else TINY_MODELS[family]()
    rep = compress(model, "qsvd-80", data=random_windows(8, 32), engine=QUIET)
    api.save(model, None, tmp_path / "c", report=rep)
    latent, _ = load_compressed(str(tmp_path / "c"))
    plain, _ = load_compressed(str(tmp_path / "c"))
    for layer in plain.model.layers:  # the same factors, K and V cached as usual
        if isinstance(layer.self_attn, LatentKVAttention):
            layer.self_attn = layer.self_attn.attn
    assert latent.llmpress_latent_kv == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    prompt = random_windows(1, 20 if family == "gemma3" else 12, seed=5)
    outs = []
    for m in (latent, plain):
        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            out = m.generate(prompt, max_new_tokens=8, do_sample=False, past_key_values=cache, output_logits=True, return_dict_in_generate=True)
        outs.append((out, cache))
    (a, ca), (b, cb) = outs
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.allclose(x, y, atol=1e-4, rtol=1e-4) for x, y in zip(a.logits, b.logits))
    r = latent.model.layers[0].self_attn.rank
    cfg = latent.config
    kv_dim = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    tokens = a.sequences.shape[1] - 1  # the last token is generated, not cached
    kept = [
        min(tokens, cfg.sliding_window - 1) if t == "sliding_attention" else tokens
        for t in getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    ]
    latent_numbers = sum(layer.keys.numel() + layer.values.numel() for layer in ca.layers)
    plain_numbers = sum(layer.keys.numel() + layer.values.numel() for layer in cb.layers)
    assert latent_numbers == sum(kept) * r
    assert plain_numbers == sum(kept) * 2 * kv_dim


@pytest.mark.parametrize("method,solver", [("svd", "rtn"), ("svd_llm", "rtn"), ("svd_llm", "gptq")])
def test_quantized_factors_store_serve_and_count(tmp_path, method, solver):
    from llmpress.quant.args import QuantArgs
    from llmpress.quant.core import bits_per_weight as grid_bits

    W4 = QuantArgs(bits=4, granularity="group", group_size=8)
    model = tiny_llama()
    ids = random_windows(8, 32)
    rep = compress(model, [stage(method, targets=["Linear"], ignore=["lm_head"], ratio=0.6, weights=W4, solver=solver)], data=ids, engine=QUIET)
    rec = rep.result.records["model.layers.0.mlp.down_proj"]
    m, n, r = rec.out_features, rec.in_features, rec.notes["rank"]
    assert r % 8 == 0 and r == rank_for_ratio(m, n, 0.6) // 8 * 8 < rank_for_ratio(m, n, 0.6)  # rounded down to whole groups of A's input
    # each factor on its grid: codes times scales give it back
    from llmpress.quant.core import QParams, fake_quantize

    for f in "AB":
        t = rec.payload[f]
        assert torch.equal(fake_quantize(t, W4, QParams(scale=rec.payload[f"{f}.scale"], zero_point=None)), t)
    assert rec.bits_per_weight() == pytest.approx((grid_bits(W4, r, m) * m * r + grid_bits(W4, n, r) * r * n) / (m * n))
    expected = logits(model, ids[:2])
    api.save(model, None, tmp_path / "c", report=rep)
    back, _ = load_compressed(str(tmp_path / "c"))
    assert isinstance(back.model.layers[0].mlp.down_proj, LowRankLinear)
    assert torch.allclose(logits(back, ids[:2]), expected, atol=1e-4, rtol=1e-4)


def test_quantized_factors_need_a_group_that_divides_the_rank():
    from llmpress.quant.args import QuantArgs

    with pytest.raises(LlmpressError, match="factor A .input = the rank 10"):
        compress(tiny_llama(), [stage("svd", targets=["Linear"], ignore=["lm_head"], rank=10,
                                      weights=QuantArgs(bits=4, granularity="group", group_size=16))], engine=QUIET)  # fmt: skip


def test_qsvd_quantized_factors_keep_one_b_and_the_latent_cache(tmp_path):
    from llmpress.quant.args import QuantArgs

    model = tiny_llama()
    ids = random_windows(8, 32)
    W4 = QuantArgs(bits=4, granularity="group", group_size=8)
    rep = compress(model, [stage("qsvd", targets=["re:.*self_attn\\.(q|k|v)_proj$"], ratio=0.8, weights=W4)], data=ids, engine=QUIET)
    expected = logits(model, ids[:2])
    api.save(model, None, tmp_path / "c", report=rep)
    from llmpress.export.packed_load import read_manifest

    meta = read_manifest(tmp_path / "c")
    assert "model.layers.0.self_attn.q_proj.B.qweight" in meta["tensors"] and not any(
        k.startswith("model.layers.0.self_attn.k_proj.B") for k in meta["tensors"]
    )
    back, _ = load_compressed(str(tmp_path / "c"))
    assert back.llmpress_latent_kv == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert torch.allclose(logits(back, ids[:2]), expected, atol=1e-4, rtol=1e-4)


def test_sweep_choice_meets_the_budget_and_spares_the_sensitive_layer():
    from llmpress.lowrank.core import rank_for_ratio as rfr
    from llmpress.lowrank.sweep import choose

    shapes = {"a": (64, 64), "b": (64, 64)}
    sens = {"a": {0.3: 5.0, 0.5: 2.0, 0.7: 0.5, 0.9: 0.1}, "b": {0.3: 0.02, 0.5: 0.01, 0.7: 0.005, 0.9: 0.001}}
    total = 2 * 64 * 64
    for budget in (0.4, 0.6, 0.8):
        ratios = choose(sens, shapes, budget)
        spent = sum(rfr(*shapes[n], r) * sum(shapes[n]) for n, r in ratios.items())
        assert spent <= budget * total
        assert ratios["a"] >= ratios["b"]  # the sensitive layer keeps more
    assert choose(sens, shapes, 0.6) == {"a": 0.9, "b": 0.3}


def test_sweep_ranks_reach_the_factor_stage():
    model = tiny_llama()
    recipe = [stage("lowrank_sweep", targets=["Linear"], ignore=["lm_head"], ratio=0.6, ratios=[0.3, 0.6, 0.9], windows=2),
              stage("svd", targets=["Linear"], ignore=["lm_head"])]  # fmt: skip
    rep = compress(model, recipe, data=random_windows(4, 16), engine=QUIET)
    (summary,) = rep.result.stages.values()
    recs = rep.result.records
    assert {n: r.notes["rank"] for n, r in recs.items()} == summary["ranks"]
    total = sum(r.out_features * r.in_features for r in recs.values())
    assert sum(r.notes["rank"] * (r.out_features + r.in_features) for r in recs.values()) <= 0.6 * total
    assert set(summary["layer_ratios"].values()) <= {0.3, 0.6, 0.9}


def test_gptq_on_the_factors_beats_rounding_them():
    """GPTQ on each factor with its own input statistics (B: H; A: B_q H B_q^T) lowers the
    output error of the quantized factorization below round-to-nearest's."""
    from llmpress.lowrank.core import quantize_factors
    from llmpress.quant.args import QuantArgs
    from llmpress.quant.core import QParams, fake_quantize
    from llmpress.quant.gptq_solve import gptq_quantize

    W3 = QuantArgs(bits=3, granularity="group", group_size=16)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 128, generator=g, dtype=torch.float64)
    mix = torch.randn(128, 128, generator=g, dtype=torch.float64)
    X = torch.randn(1024, 128, generator=g, dtype=torch.float64) @ mix  # correlated inputs: error feedback has room
    H = X.T @ X / 1024
    A, B, _ = whitened_factors(W, whitening_factor(H).L, 32)
    base = output_error(W, A, B, H)  # the truncation's share
    added = {}
    for solver in ("rtn", "gptq"):
        Aq, Bq, q = quantize_factors(A, B, W3, W=W, H=H, gptq=gptq_quantize if solver == "gptq" else None)
        assert torch.equal(fake_quantize(Aq.float(), W3, QParams(scale=q["A.scale"], zero_point=None)), Aq.float())  # on the grid
        added[solver] = output_error(W, Aq.double(), Bq.double(), H) - base
    assert 0 < added["gptq"] < 0.95 * added["rtn"], added


def test_factor_solver_gptq_is_refused_without_statistics_or_grid():
    from llmpress.lowrank.svd import SVD
    from llmpress.lowrank.wsvd import WSVD
    from llmpress.quant.args import QuantArgs

    W4 = QuantArgs(bits=4, granularity="group", group_size=8)
    with pytest.raises(UserError, match="svd uses no calibration data"):
        SVD(ratio=0.5, weights=W4, solver="gptq")
    with pytest.raises(UserError, match="wsvd: solver gptq"):
        WSVD(ratio=0.5, weights=W4, solver="gptq")
    with pytest.raises(UserError, match="set weights"):
        SVDLLM(ratio=0.5, solver="gptq")
    with pytest.raises(UserError, match="expected rtn or gptq"):
        SVDLLM(ratio=0.5, solver="awq")


def test_weighted_factors_lower_the_weighted_error_and_keep_svd_when_uniform():
    from llmpress.lowrank.wsvd import weighted_factors

    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 32, generator=g)
    # uniform weights: the truncated SVD is optimal; descent cannot beat it (the best iterate is kept)
    A, B, start, final = weighted_factors(W, torch.ones_like(W), 6, steps=50, lr=0.01)
    A0, B0, _ = svd_factors(W.double(), 6)
    assert final <= start and final == pytest.approx(start, rel=1e-3)
    # heavy weights on a few rows: the weighted error falls well below the SVD's
    a = torch.ones_like(W)
    a[:4] = 100.0
    A, B, start, final = weighted_factors(W, a, 6, steps=300, lr=0.01)
    assert final < 0.7 * start
    an = a / a.sum()
    assert float(((W - A @ B) ** 2 * an).sum()) == pytest.approx(final, rel=1e-4)
    svd_rows = float(((W - (A0 @ B0).float())[:4] ** 2).sum())
    assert float(((W - A @ B)[:4] ** 2).sum()) < 0.5 * svd_rows  # the important rows are kept better


def test_weight_importance_is_the_mean_squared_gradient():
    import torch.nn.functional as F

    from llmpress.arch import get_arch
    from llmpress.lowrank.importance import WeightImportance, importance

    model = tiny_llama()
    ids = random_windows(4, 16)
    name = "model.layers.1.mlp.up_proj"
    got = importance(model, [name], ids, WeightImportance(windows=4, batch_size=2))[name]
    got_g = importance(model, [name], ids, WeightImportance(score="grad", windows=4, batch_size=2))[name]
    w = model.get_submodule(name).weight
    sq, ab = torch.zeros_like(w), torch.zeros_like(w)
    for i in (0, 2):
        x = ids[i : i + 2]
        logit = model(input_ids=x).logits[:, :-1]
        loss = F.cross_entropy(logit.reshape(-1, logit.shape[-1]), x[:, 1:].reshape(-1))
        (gw,) = torch.autograd.grad(loss, [w])
        sq += gw**2 / 2
        ab += gw.abs() / 2
    assert torch.allclose(got, sq, rtol=1e-4, atol=1e-12)
    assert torch.allclose(got_g, ab**2, rtol=1e-4, atol=1e-12)
    assert get_arch(model) is not None and not any(p.requires_grad is False for p in model.parameters())  # flags restored


def test_wsvd_needs_weight_importance_before_it():
    model = tiny_llama()
    ids = random_windows(4, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"stage 0 \(wsvd\) needs a weight_importance stage"):
        compress(model, [stage("wsvd", targets=["Linear"], ignore=["lm_head"], ratio=0.5)], data=ids, engine=QUIET)
    with pytest.raises(UserError, match=r"stage 1 \(asvd\) needs a weight_importance stage"):
        compress(model, [stage("weight_importance", targets=["re:.*q_proj$"]), stage("asvd", targets=["Linear"], ignore=["lm_head"],
                 ratio=0.5, scale="fisher")], data=ids, engine=QUIET)  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("second", ["wsvd", "asvd-fisher"])
def test_importance_weighted_methods_compress_and_serve(tmp_path, second):
    model = tiny_llama()
    ids = random_windows(8, 32)
    lin = dict(targets=["Linear"], ignore=["lm_head"], ratio=0.5)
    st = stage("wsvd", steps=40, **lin) if second == "wsvd" else stage("asvd", scale="fisher", **lin)
    rep = compress(model, [stage("weight_importance", targets=["Linear"], ignore=["lm_head"], windows=4), st], data=ids, engine=QUIET)
    rec = rep.result.records["model.layers.0.mlp.down_proj"]
    assert rec.form == "lowrank" and rec.notes["rank"] == rank_for_ratio(rec.out_features, rec.in_features, 0.5)
    if second == "wsvd":
        assert rec.notes["weighted_error"] < rec.notes["weighted_error_svd"]
    summary = rep.result.stages["stage0:weight_importance"]
    assert summary["score"] == "fisher" and summary["linears"] == 14
    expected = logits(model, ids[:2])
    api.save(model, None, tmp_path / "c", report=rep)
    back, _ = load_compressed(str(tmp_path / "c"))
    assert isinstance(back.model.layers[0].mlp.down_proj, LowRankLinear)
    assert torch.allclose(logits(back, ids[:2]), expected, atol=1e-4, rtol=1e-4)


def test_sweep_replay_of_earlier_blocks_gives_the_full_recomputation():
    """The sweep skips the blocks before the truncated layer's (their recorded outputs replay):
    the loss increases equal recomputing the whole model, over several batches."""
    from llmpress.lowrank.sweep import LowRankSweep, sensitivities

    model = tiny_llama()
    data = random_windows(6, 16)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    cfg = LowRankSweep(ratio=0.6, ratios=(0.3, 0.6), windows=5, batch_size=2)
    fast = sensitivities(model, names, data, cfg)
    slow = sensitivities(model, names, data, cfg, replay=False)
    assert all(abs(fast[n][r] - slow[n][r]) < 1e-6 * max(1.0, abs(slow[n][r])) for n in names for r in cfg.ratios)
    assert all(abs(slow[n][0.3]) > 1e-4 for n in names[1:])  # block 1 replays block 0: a wrong batch would move these
    assert not any("forward" in vars(b) for b in model.model.layers)  # the blocks are restored


QKV = ["re:.*self_attn\\.(q|k|v)_proj$"]


@pytest.mark.parametrize("rule", ["greedy", "proportional"])
def test_joint_allocation_gives_qsvd_one_rank_per_block_within_the_budget(rule):
    """lowrank_alloc with joint: qkv scores the singular values of each block's stacked q/k/v
    and gives the three one rank, which qsvd keeps; the budget counts r (d_q + 2 d_kv + E)."""
    model = tiny_llama(layers=3)
    recipe = [stage("lowrank_alloc", targets=QKV, ratio=0.5, joint="qkv", windows=2, rule=rule), stage("qsvd", targets=QKV)]
    rep = compress(model, recipe, data=random_windows(4, 16), engine=QUIET)
    (summary,) = rep.result.stages.values()
    recs = rep.result.records
    per_block = {}
    for i in range(3):
        ranks = {summary["ranks"][f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}
        (r,) = ranks  # one rank for the three
        assert all(recs[f"model.layers.{i}.self_attn.{p}_proj"].notes["joint_rank"] == r for p in "qkv")
        per_block[i] = r
    m, n = 64 + 2 * 32, 64  # stacked q/k/v of the tiny model: 4 heads of 16, 2 key/value heads
    assert sum(r * (m + n) for r in per_block.values()) <= 0.5 * 3 * m * n
    slack = (m + n) if rule == "greedy" else 3 * (m + n)  # greedy: within one value; proportional: one rounding per block
    assert sum(r * (m + n) for r in per_block.values()) > 0.5 * 3 * m * n - slack
    assert summary["spent_ratio"] == pytest.approx(sum(r * (m + n) for r in per_block.values()) / (3 * m * n), abs=1e-6)


def test_qsvd_refuses_per_linear_ranks_and_joint_refuses_other_linears():
    data = random_windows(4, 16)
    with pytest.raises(LlmpressError, match="joint: qkv"):  # separate allocation gives q (64x64) and k (32x64) different ranks
        compress(tiny_llama(), [stage("lowrank_alloc", targets=QKV, ratio=0.5, windows=2), stage("qsvd", targets=QKV)], data=data, engine=QUIET)
    with pytest.raises(LlmpressError, match="q/k/v projections only"):
        compress(tiny_llama(), [stage("lowrank_alloc", targets=["Linear"], ignore=["lm_head"], ratio=0.5, joint="qkv"), stage("qsvd", targets=QKV)],
                 data=data, engine=QUIET)  # fmt: skip
    with pytest.raises(LlmpressError, match="needs q, k and v"):
        compress(tiny_llama(), [stage("lowrank_alloc", targets=["re:.*self_attn\\.(q|k)_proj$"], ratio=0.5, joint="qkv")], data=data, engine=QUIET)
    with pytest.raises(LlmpressError, match="expected qkv"):
        stage("lowrank_alloc", targets=QKV, joint="mlp")


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_weight_grads_hands_each_gradient_once_and_cleans_up(family):
    """The streamed gradients (blocks recomputed in the backward pass) equal autograd's on the
    plain forward, one per weight and batch; nothing is left in ``.grad``, every parameter's
    requires_grad is restored and the blocks' own forward is back."""
    from llmpress.lowrank.grads import weight_grads

    model = TINY_MODELS[family]()
    ids = random_windows(4, 16)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a flag to restore
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got, calls = [], []
    layer = model.model.layers[1]
    inner = layer.forward
    layer.forward = lambda *a, **k: (torch.is_grad_enabled() and calls.append(1)) or inner(*a, **k)  # the block's runs with gradients
    batches = weight_grads(model, names, ids, 4, 2, lambda n, g: got.append((n, g.clone())))
    assert len(calls) == 2 * batches  # recomputed in each backward pass, not kept
    del layer.forward
    assert batches == 2 and sorted(n for n, _ in got) == sorted(names * 2)
    for b in range(2):
        x = ids[2 * b : 2 * b + 2]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        want = torch.autograd.grad(loss, [model.get_submodule(n).weight for n in names])
        for n, w in zip(names, want):
            assert torch.allclose([g for m, g in got if m == n][b], w, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)


def test_joint_unit_gradients_are_the_stacked_weights():
    """A q/k/v unit's singular-value gradients are those of the stacked weight (its members'
    gradients joined in order, whatever order the backward pass delivers them in)."""
    from llmpress.lowrank.allocate import LowRankAlloc, singular_value_grads

    model = tiny_llama()
    ids = random_windows(2, 16)
    names = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    ((S, g),) = singular_value_grads(model, {"u": names}, ids, LowRankAlloc(windows=2, batch_size=2)).values()
    W = torch.cat([model.get_submodule(n).weight.detach() for n in names]).double()
    U, S2, Vh = torch.linalg.svd(W, full_matrices=False)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    G = torch.cat(torch.autograd.grad(loss, [model.get_submodule(n).weight for n in names])).double()
    assert torch.allclose(S, S2)
    assert torch.allclose(g, ((U.T @ G) * Vh).sum(1).abs(), rtol=1e-3, atol=1e-7)


def test_weight_grads_refuses_a_weight_the_loss_does_not_reach():
    """A linear outside the forward pass gets no gradient: a clear error, not a missing score."""
    from llmpress.lowrank.grads import weight_grads

    model = tiny_llama()
    model.model.layers[0].spare = nn.Linear(8, 8)  # registered, never called
    got = []
    with pytest.raises(UserError, match="spare"):
        weight_grads(model, ["model.layers.0.spare", "model.layers.0.mlp.up_proj"], random_windows(2, 16), 2, 2, lambda n, g: got.append(n))
    assert got == ["model.layers.0.mlp.up_proj"]
    assert all(p.grad is None for p in model.parameters())
