"""Mixed precision: the allocator (budget, optimum against brute force, bad input) and
`plan-bits` (costs from Hessians, the written recipe compresses a tiny model)."""

import itertools
import random

import pytest
import torch
import yaml
from conftest import random_windows, tiny_llama
from helpers import QUIET, cli_fails, run_cli

from llmpress import UserError, compress
from llmpress.bitplan import plan_bits, setting_cost
from llmpress.calib.dense import collect_hessians
from llmpress.quant import QuantArgs, quantize_weight
from llmpress.quant.hessian import layer_error
from llmpress.quant.mixed import allocate, budget_bits, parse_candidate, parse_candidates, setting_bits
from llmpress.recipe import Recipe, load_recipe


def brute_force(costs, sizes, budget):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        if sum(sizes[i][k] for i, k in enumerate(pick)) <= budget:
            cost = sum(costs[i][k] for i, k in enumerate(pick))
            if best is None or cost < best[0]:
                best = (cost, list(pick))
    return best


def random_problem(seed, layers=6, options=4):
    rng = random.Random(seed)
    sizes = [[rng.randint(1, 40) * 8 for _ in range(options)] for _ in range(layers)]
    costs = [[rng.uniform(0, 10) for _ in range(options)] for _ in range(layers)]
    return costs, sizes


@pytest.mark.parametrize("seed", range(8))
def test_allocation_is_the_brute_force_optimum_within_budget(seed):
    costs, sizes = random_problem(seed)
    lo, hi = sum(min(b) for b in sizes), sum(max(b) for b in sizes)
    for budget in (lo, (lo + hi) // 3, (lo + hi) // 2, hi):
        a = allocate(costs, sizes, budget)
        want = brute_force(costs, sizes, budget)
        assert a.exact and a.total_bits <= budget
        assert a.total_cost == pytest.approx(want[0], abs=1e-9)
        assert a.total_bits == sum(sizes[i][k] for i, k in enumerate(a.choice))


def test_planted_mix():
    # three layers of 100 weights at 2, 3 or 4 bits: layer 1 is very sensitive, layer 2 is not;
    # 3 bits per weight on average (900 bits): 3/4/2 bits is the best mix (a brute force agrees)
    sizes = [[200, 300, 400]] * 3
    costs = [[5.0, 2.0, 1.0], [100.0, 10.0, 1.0], [0.5, 0.3, 0.2]]
    a = allocate(costs, sizes, 900)
    assert a.choice == brute_force(costs, sizes, 900)[1] == [1, 2, 0] and a.total_bits == 900 and a.total_cost == pytest.approx(2.0 + 1.0 + 0.5)
    # 100 bits less: the sensitive layer keeps 4 bits, the other two drop to 2
    b = allocate(costs, sizes, 800)
    assert b.choice == [0, 2, 0] and b.total_cost == pytest.approx(5.0 + 1.0 + 0.5)


def test_coarse_grid_never_exceeds_budget():
    costs, sizes = random_problem(3, layers=8)
    sizes = [[s + 1 for s in b] for b in sizes]  # gcd 1: a fine grid
    lo, hi = sum(min(b) for b in sizes), sum(max(b) for b in sizes)
    for budget in range(lo, hi, 37):
        a = allocate(costs, sizes, budget, max_steps=16)
        assert not a.exact or budget <= 16
        assert a.total_bits <= budget
        assert a.total_cost >= brute_force(costs, sizes, budget)[0] - 1e-9


def test_bad_input():
    with pytest.raises(UserError, match="below the smallest option"):
        allocate([[1.0, 2.0]], [[100, 50]], 49)
    with pytest.raises(UserError, match="no linear"):
        allocate([], [], 10)
    with pytest.raises(UserError, match="at least one option"):
        allocate([[]], [[]], 10)
    with pytest.raises(UserError, match="empty"):
        parse_candidates(" , ", QuantArgs())
    with pytest.raises(UserError, match="twice"):
        parse_candidates("w4g64,w4g64", QuantArgs())
    with pytest.raises(UserError, match="wBITS"):
        parse_candidate("int4", QuantArgs())
    with pytest.raises(UserError, match="2 to 8"):
        parse_candidate("w9g64", QuantArgs())
    with pytest.raises(UserError, match="budget"):
        budget_bits(0.0, 10)


def test_candidates_and_sizes_match_the_size_report():
    base = QuantArgs(bits=4, group_size=64, full_range=True)
    c = parse_candidates("w2g64,W3g32,w8", base)
    assert c["w2g64"] == QuantArgs(bits=2, group_size=64, full_range=True)
    assert c["w3g32"].group_size == 32 and c["w8"].granularity == "channel" and c["w8"].full_range
    # 4 bits + a 16-bit scale per 64 weights
    assert setting_bits(QuantArgs(bits=4, group_size=64), 8, 128) == 8 * 128 * 4 + 8 * 2 * 16
    m = tiny_llama()
    rep = compress(m, [__import__("llmpress").stage("rtn", weights=c["w3g32"])], engine=QUIET)
    r = rep.result.records["model.layers.0.mlp.down_proj"]
    assert setting_bits(c["w3g32"], r.out_features, r.in_features) == pytest.approx(r.bits_per_weight() * r.n_params)


def test_costs_are_hessian_weighted_errors():
    m = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    H = collect_hessians(m, [name], random_windows(4, 16))[name]
    w = dict(m.named_modules())[name].weight.detach()
    args = QuantArgs(bits=3, group_size=32)
    rtn, _ = quantize_weight(w, args)
    assert setting_cost(w, H, args, "rtn") == pytest.approx(layer_error(w, rtn, H))
    assert setting_cost(w, H, args, "gptq") < setting_cost(w, H, args, "rtn")
    assert setting_cost(w, H, QuantArgs(bits=8, group_size=32), "rtn") < setting_cost(w, H, args, "rtn")


def test_linears_reading_one_input_share_one_hessian():
    m = tiny_llama()
    ids = random_windows(4, 16)
    names = [
        f"model.layers.1.{p}"
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
    ]
    H = collect_hessians(m, names, ids)
    assert H[names[0]] is H[names[1]] is H[names[2]] and H[names[4]] is H[names[5]]
    assert H[names[3]] is not H[names[0]] and H[names[4]] is not H[names[0]]
    for n in names:  # each equal to the linear's own, computed alone
        torch.testing.assert_close(H[n], collect_hessians(m, [n], ids)[n])


def test_block_by_block_hessians_equal_a_whole_model_pass_and_come_one_block_at_a_time():
    """The dense model run block by block gives each linear the matrix that hooks on one
    whole-model forward give; each block's matrices come (and go) before the next block runs."""
    from llmpress.calib.accumulators import HessianAccumulator
    from llmpress.calib.dense import block_hessians

    m = tiny_llama()
    ids = random_windows(6, 16)
    names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n.startswith("model.layers.")]
    accs = {n: HessianAccumulator() for n in names}
    hooks = [dict(m.named_modules())[n].register_forward_hook(lambda _m, i, _o, a=accs[n]: a.add(i[0].detach())) for n in names]
    with torch.no_grad():
        for b in ids.split(4):
            m(input_ids=b, use_cache=False)
    for h in hooks:
        h.remove()
    seen = []
    ran = []
    probe = m.model.layers[1].register_forward_hook(lambda *_: ran.append(len(seen)))
    for blk in block_hessians(m, names, ids, batch_size=4):
        seen.append(blk)
    probe.remove()
    assert [sorted(b) for b in seen] == [sorted(n for n in names if n.startswith(f"model.layers.{i}.")) for i in range(2)]
    assert ran and set(ran) == {1}  # block 1 ran after block 0's matrices were handed over
    for blk in seen:
        for n, H in blk.items():
            torch.testing.assert_close(H, accs[n].result(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk", [None, 5])
def test_fisher_is_the_mean_squared_output_gradient_and_weights_rows(monkeypatch, chunk):
    """collect_fisher gives E_t[(dL/dy_tj)^2] of a linear's outputs (checked against autograd
    on the same windows, the model's own loss), and setting_cost weights each output row's
    error by it; the head and loss a few tokens at a time (``chunk``) give the same."""
    import torch

    import llmpress.runtime.head as head
    from llmpress.calib.sensitivity import collect_fisher

    if chunk is not None:
        calls = []
        monkeypatch.setattr(head, "chunk_tokens", lambda *_a: calls.append(1) or chunk)
    m = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    ids = random_windows(4, 16)
    f = collect_fisher(m, [name], ids, batch_size=2)[name]
    if chunk is not None:
        assert calls  # the chunked loss ran (2 x 15 scored tokens a batch: 6 chunks)
    outs = []

    def keep(_m, _i, o):
        o.retain_grad()
        outs.append(o)

    h = dict(m.named_modules())[name].register_forward_hook(keep)
    want = 0.0
    for b in ids.split(2):
        outs.clear()
        emb = m.get_input_embeddings()(b).detach().requires_grad_(True)
        m(inputs_embeds=emb, labels=b).loss.backward()
        want = want + outs[0].grad.pow(2).reshape(-1, outs[0].shape[-1]).sum(0)
    h.remove()
    m.zero_grad(set_to_none=True)
    torch.testing.assert_close(f, (want / ids.numel()).double(), rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in m.parameters())  # collect_fisher gives the weights no gradients
    assert all("forward" not in layer.__dict__ for layer in m.model.layers)  # the blocks' checkpointing undone
    H = collect_hessians(m, [name], ids)[name]
    w = dict(m.named_modules())[name].weight.detach()
    args = QuantArgs(bits=3, group_size=32)
    rtn, _ = quantize_weight(w, args)
    ones = torch.ones(w.shape[0], dtype=torch.float64)
    assert setting_cost(w, H, args, "rtn", fisher=ones) == pytest.approx(layer_error(w, rtn, H))
    row = torch.zeros(w.shape[0], dtype=torch.float64)
    row[5] = 2.0
    D = (w - rtn).double()
    assert setting_cost(w, H, args, "rtn", fisher=row) == pytest.approx(2.0 * float(D[5] @ H.double() @ D[5]))


def test_fisher_weighting_changes_the_plan_and_unknown_weighting_is_refused():
    data = random_windows(4, 32)
    plans = {wt: plan_bits(tiny_llama(), data, base=load_recipe("gptq-w4g64"), candidates="w2g32,w3g32,w4g32,w8g32", budget=3.25, weighting=wt)
             for wt in ("fisher", "none")}  # fmt: skip
    assert all(p.bits_per_weight <= 3.25 for p in plans.values())
    assert plans["fisher"].choice != plans["none"].choice
    with pytest.raises(UserError, match="weighting 'hessian' unknown"):
        plan_bits(tiny_llama(), data, base=load_recipe("gptq-w4g64"), candidates="w3g32,w4g32", budget=3.5, weighting="hessian")


def test_plan_bits_recipe_compresses_within_budget():
    m = tiny_llama()
    data = random_windows(4, 32)
    plan = plan_bits(m, data, base=load_recipe("gptq-w4g64"), candidates="w2g32,w3g32,w4g32", budget=3.4)
    assert plan.bits_per_weight <= 3.4 and plan.exact
    assert len(plan.choice) == 14 and len(set(plan.choice.values())) >= 2
    assert plan.uniform["w3g32"][1] > plan.cost > plan.uniform["w4g32"][1]
    # the recipe round-trips through YAML and compresses to the planned bits
    recipe = Recipe.from_yaml(plan.recipe.to_yaml())
    assert all(st.ignore == () and all(t in plan.choice for t in st.targets) for st in recipe.stages)
    rep = compress(tiny_llama(), recipe, data=data, engine=QUIET)
    recs = rep.result.records
    assert {n: f"w{r.weight_args.bits}g{r.weight_args.group_size}" for n, r in recs.items()} == plan.choice
    bits = sum(r.bits_per_weight() * r.n_params for r in recs.values()) / sum(r.n_params for r in recs.values())
    assert bits == pytest.approx(plan.bits_per_weight)
    with pytest.raises(UserError, match="below the smallest option"):
        plan_bits(m, data, base=load_recipe("rtn-w4g64"), candidates="w2g32,w4g32", budget=2.1)


def test_plan_is_deterministic():
    data = random_windows(4, 16)
    a, b = (
        plan_bits(tiny_llama(), data, base=load_recipe("gptq-w4g64"), candidates="w2g32,w3g32,w4g32", budget=3.0, solver="gptq") for _ in range(2)
    )
    assert a.choice == b.choice and a.cost == b.cost and a.recipe.to_yaml() == b.recipe.to_yaml()
    assert a.bits_per_weight <= 3.0


def test_plan_keeps_the_head_stage():
    m = tiny_llama()
    plan = plan_bits(m, random_windows(2, 16), base=load_recipe("rtn-w4g64-head8"), candidates="w3g32,w4g32", budget=3.6)
    heads = [st for st in plan.recipe.stages if "lm_head" in st.targets]
    assert len(heads) == 1 and heads[0].config.weights.bits == 8
    assert sum(len(st.targets) for st in plan.recipe.stages if st not in heads) == 14


def test_a_setting_offered_only_where_its_group_divides():
    # tiny llama: inputs of 64 (attention, gate/up) and 128 (down_proj); g128 fits down_proj only
    plan = plan_bits(tiny_llama(), random_windows(2, 16), base=load_recipe("rtn-w4g64"), candidates="w2g32,w4g128", budget=8.0)
    assert plan.uniform["w4g128"] is None and plan.uniform["w2g32"] is not None
    assert {n for n, lab in plan.choice.items() if lab == "w4g128"} == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert "(not for every linear)" in plan.table()


def test_cli(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "mixed.yaml"
    argv = ["plan-bits", str(tiny_model_dir), "--budget", "3.5", "--candidates", "w3g32,w4g32", "--out", str(out)]
    argv += ["--calib-samples", "4", "--calib-seqlen", "32", "--no-progress"]
    assert run_cli(argv) == 0
    text = capsys.readouterr().out
    assert "mixed" in text and str(out) in text
    d = yaml.safe_load(out.read_text())
    assert d["name"] == "gptq-w4g64-mixed3.5" and {s["weights"]["bits"] for s in d["stages"]} <= {3, 4}
    cli_fails(capsys, argv[:3] + ["1.5"] + argv[4:], "below the smallest candidate")
    cli_fails(capsys, argv[:5] + [" "] + argv[6:], "empty")
    cli_fails(capsys, argv + ["--base", "magnitude-50"], "no stage quantizes weights")
    out.unlink()
    assert run_cli(argv + ["--measure", "block", "--measure-windows", "2"]) == 0
    # auto: GPTQ's costs for a GPTQ base; fisher: a llama has no post-norms
    assert "(solver gptq, measure block, weighting fisher)" in capsys.readouterr().out
    assert yaml.safe_load(out.read_text())["name"] == "gptq-w4g64-mixed3.5"


def test_a_search_only_stage_stays_whole():
    """AWQ with ``quantize: false`` stores nothing: the plan keeps it as one stage over every linear
    (split per setting, a group whose linears got different settings would get no scales), so
    the planned recipe's AWQ scales every linear that the base recipe's AWQ scales."""
    m, data = tiny_llama(), random_windows(4, 32)
    base = load_recipe("awq-gptq-w4g64")
    plan = plan_bits(m, data, base=base, candidates="w2g32,w3g32,w4g32", budget=3.0, solver="rtn")
    awq = [st for st in plan.recipe.stages if st.method == "awq"]
    assert len(awq) == 1 and awq[0].targets == base.stages[0].targets
    gptq = [st for st in plan.recipe.stages if st.method == "gptq"]
    assert len(gptq) >= 2 and sorted(t for st in gptq for t in st.targets) == sorted(plan.choice)

    def scaled(recipe):
        recs = compress(tiny_llama(), recipe, data=data, engine=QUIET).result.records
        return {n for n, r in recs.items() if "alpha" in r.notes.get("awq", {})}

    # the plan mixes settings inside some group that AWQ scales together (q/k/v or gate/up)
    groups = [[f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(2)] + [
        [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")] for i in range(2)
    ]
    assert any(len({plan.choice[n] for n in g}) > 1 for g in groups)
    ref = scaled(base)
    assert ref and scaled(plan.recipe) == ref


def test_block_fisher_is_the_fisher_of_the_last_linear_that_adds_into_it():
    """A decoder block's output is its input plus down_proj's output: the loss gradient with
    respect to both is the same, so collect_fisher gives the block (a tuple-returning module)
    the same E_t[(dL/dh)^2] as its down_proj."""
    from llmpress.calib.sensitivity import collect_fisher

    m, ids = tiny_llama(), random_windows(4, 16)
    f = collect_fisher(m, ["model.layers.0", "model.layers.0.mlp.down_proj"], ids, batch_size=2)
    assert float(f["model.layers.0"].sum()) > 0
    torch.testing.assert_close(f["model.layers.0"], f["model.layers.0.mlp.down_proj"], rtol=1e-6, atol=1e-15)


def test_block_output_cost_is_the_blocks_output_error():
    """block_output_cost: 2 x the mean over tokens of the squared change of the block's output
    with one linear replaced (checked against a whole-model forward with the weight swapped),
    0 for the dense weight, the weight restored after."""
    from llmpress.calib.dense import block_output_cost, dense_blocks

    m, ids = tiny_llama(), random_windows(4, 16)
    name = "model.layers.1.self_attn.q_proj"
    lin = dict(m.named_modules())[name]
    w = lin.weight.detach().clone()
    w_hat, _ = quantize_weight(w, QuantArgs(bits=2, group_size=32))
    for i, blk in enumerate(dense_blocks(m, [name], ids, batch_size=2, last_outputs=True)):  # a block's inputs live until the next is asked for
        if i == 1:
            cost = block_output_cost(blk, lin, w_hat, batches=1)
            assert torch.equal(lin.weight, w) and block_output_cost(blk, lin, w, batches=1) == 0.0

    def layer1_out(weight):
        got = []
        h = m.model.layers[1].register_forward_hook(lambda _m, _i, o: got.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            lin.weight.copy_(weight)
            m(input_ids=ids[:2], use_cache=False)
            lin.weight.copy_(w)
        h.remove()
        return got[0]

    want = 2.0 * float((layer1_out(w_hat) - layer1_out(w)).pow(2).sum()) / (2 * 16)
    assert cost == pytest.approx(want, rel=1e-4) and cost > 0


def test_block_measure_sees_what_the_block_ignores():
    """Planted: block 0's attention output projection is zero, so its q/k/v change nothing the
    block hands over. Measured on the block's output (unweighted) they cost nothing and the plan
    gives them the fewest bits; measured on their own outputs they cost what any linear does."""
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.zero_()
    data = random_windows(4, 32)
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    kw = {"base": load_recipe("gptq-w4g64"), "candidates": "w2g32,w4g32,w8g32", "budget": 4.25, "weighting": "none"}
    block = plan_bits(m, data, measure="block", measure_windows=4, **kw)
    layer = plan_bits(m, data, **kw)
    assert block.bits_per_weight <= 4.25 and {block.choice[n] for n in qkv} == {"w2g32"}
    assert {layer.choice[n] for n in qkv} != {"w2g32"}
    with pytest.raises(UserError, match="measure 'output' unknown"):
        plan_bits(m, data, measure="output", **kw)
    with pytest.raises(UserError, match="measure_windows must be at least 1"):
        plan_bits(m, data, measure="block", measure_windows=0, **kw)


def test_token_sensitivity_is_each_tokens_squared_gradient_over_its_mean():
    """collect_sensitivity(per_token=True): per linear, each token's sum_j (dL/dy_tj)^2 over
    the mean over tokens (checked against autograd, the windows' shape, 0 at the last
    position where no loss reaches), and the same per-channel Fisher as collect_fisher."""
    from llmpress.calib.sensitivity import collect_fisher, collect_sensitivity

    m, ids = tiny_llama(), random_windows(4, 16)
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"]
    fisher, tokens = collect_sensitivity(m, names, ids, batch_size=2, per_token=True)
    assert collect_sensitivity(m, names, ids, batch_size=2)[1] == {}
    plain = collect_fisher(m, names, ids, batch_size=2)
    for n in names:
        torch.testing.assert_close(fisher[n], plain[n])
    outs = []
    mod = dict(m.named_modules())

    def keep(_m, _i, o):
        o.retain_grad()
        outs.append(o)

    hs = [mod[n].register_forward_hook(keep) for n in names]
    want = {n: [] for n in names}
    for b in ids.split(2):
        outs.clear()
        emb = m.get_input_embeddings()(b).detach().requires_grad_(True)
        m(inputs_embeds=emb, labels=b).loss.backward()
        by = dict(zip(sorted(names, key=list(mod).index), outs))  # hooks fire in model order
        for n in names:
            want[n].append(by[n].grad.pow(2).sum(-1))
    for h in hs:
        h.remove()
    m.zero_grad(set_to_none=True)
    for n in names:
        w = torch.cat(want[n])
        assert tokens[n].shape == ids.shape
        torch.testing.assert_close(tokens[n], w / w.mean(), rtol=1e-4, atol=1e-7)
        assert float(tokens[n].mean()) == pytest.approx(1.0, rel=1e-5) and float(tokens[n][:, -1].abs().max()) == 0.0
        assert float(tokens[n].std()) > 0.1  # the tokens differ: the weighting has something to do


def test_token_weighted_cost_hessian_weighs_each_tokens_input():
    """dense_blocks(token_weights=...): a weighted linear's cost Hessian is 2/n sum_t a_t x_t x_t^T
    (checked against its captured inputs); all-ones weights give the plain Hessian; the
    solver's Hessian (``hessians``) is unchanged; unweighted linears have none."""
    from llmpress.calib.dense import dense_blocks

    m, ids = tiny_llama(), random_windows(4, 16)
    q, k = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"
    a = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) * 3
    xs = []
    h = dict(m.named_modules())[q].register_forward_hook(lambda _m, i, _o: xs.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    blocks = list(dense_blocks(m, [q, k], ids, batch_size=2, token_weights={q: a}))
    h.remove()
    blk = blocks[1]
    X = torch.cat(xs).double()
    torch.testing.assert_close(blk.cost_hessians[q].double(), 2 / X.shape[0] * (X * a.reshape(-1, 1).double()).T @ X, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(blk.hessians[q].double(), 2 / X.shape[0] * X.T @ X, rtol=1e-4, atol=1e-6)
    assert k not in blk.cost_hessians and blocks[0].cost_hessians == {}
    ones = list(dense_blocks(m, [q], ids, batch_size=2, token_weights={q: torch.ones(ids.shape)}))[1]
    torch.testing.assert_close(ones.cost_hessians[q], ones.hessians[q], rtol=1e-5, atol=1e-7)


def test_token_weighted_block_cost_and_plan():
    """block_output_cost with token weights: all ones give the unweighted cost, zeros give 0;
    plan_bits with --weighting fisher-token (both measures) keeps to the budget."""
    from llmpress.calib.dense import block_output_cost, dense_blocks

    m, ids = tiny_llama(), random_windows(4, 16)
    name = "model.layers.1.self_attn.o_proj"
    lin = dict(m.named_modules())[name]
    w_hat, _ = quantize_weight(lin.weight.detach(), QuantArgs(bits=2, group_size=32))
    for i, blk in enumerate(dense_blocks(m, [name], ids, batch_size=2, last_outputs=True)):
        if i == 1:
            plain = block_output_cost(blk, lin, w_hat, batches=2)
            assert plain > 0
            assert block_output_cost(blk, lin, w_hat, batches=2, tokens=torch.ones(ids.shape)) == pytest.approx(plain, rel=1e-6)
            assert block_output_cost(blk, lin, w_hat, batches=2, tokens=torch.zeros(ids.shape)) == 0.0
    data = random_windows(4, 32)
    for measure in ("layer", "block"):
        plan = plan_bits(tiny_llama(), data, base=load_recipe("gptq-w4g64"), candidates="w2g32,w3g32,w4g32,w8g32", budget=3.25,
                         weighting="fisher-token", measure=measure)  # fmt: skip
        assert 2.0 < plan.bits_per_weight <= 3.25 and plan.cost > 0


def test_auto_weighting_is_per_token_where_the_architecture_has_post_norms():
    """weighting auto (the default): fisher-token on gemma (post-norms), fisher on llama; the
    plan says which it used and equals the explicit one's."""
    from conftest import tiny_gemma3

    from llmpress.bitplan import resolved_weighting

    assert resolved_weighting(tiny_gemma3(), "auto") == "fisher-token" and resolved_weighting(tiny_llama(), "auto") == "fisher"
    assert resolved_weighting(tiny_gemma3(), "none") == "none"
    data = random_windows(4, 32)
    kw = {"base": load_recipe("gptq-w4g64"), "candidates": "w2g32,w3g32,w4g32,w8g32", "budget": 3.25}
    for make, want in ((tiny_gemma3, "fisher-token"), (tiny_llama, "fisher")):
        auto, explicit = plan_bits(make(), data, **kw), plan_bits(make(), data, **kw, weighting=want)
        assert auto.weighting == want and auto.choice == explicit.choice and auto.cost == pytest.approx(explicit.cost)


@pytest.mark.parametrize(("base", "solver"), [("gptq-w4g64", "gptq"), ("awq-gptq-w4g64", "gptq"), ("blockwise-w3g64", "gptq"), ("rtn-w4g64", "rtn")])
def test_auto_solver_follows_the_base_method(base, solver):
    """--solver auto measures each setting's cost after GPTQ where the plan is compressed by GPTQ
    or blockwise (an AWQ search-only stage before GPTQ does not count), after nearest rounding
    otherwise; an explicit solver stays as given."""
    from llmpress.bitplan import resolved_solver

    recipe = load_recipe(base)
    assert resolved_solver(recipe, "auto") == solver
    assert resolved_solver(recipe, "rtn") == "rtn"
    data, kw = random_windows(4, 32), {"base": recipe, "candidates": "w2g32,w4g32", "budget": 3.5, "weighting": "none"}
    auto = plan_bits(tiny_llama(), data, **kw)
    explicit = plan_bits(tiny_llama(), data, **kw, solver=solver)
    assert auto.solver == solver and auto.choice == explicit.choice and auto.cost == pytest.approx(explicit.cost)
    if solver != "rtn":  # the costs are GPTQ's, not nearest rounding's
        rtn = plan_bits(tiny_llama(), data, **kw, solver="rtn")
        assert auto.uniform["w2g32"][1] < rtn.uniform["w2g32"][1]


def test_blockwise_solver_learns_each_setting_and_keeps_to_the_budget():
    """--solver blockwise: the costs of the settings below 8 bits come from weights learned
    together per block (different from nearest rounding's, on the grid), 8 bits from nearest
    rounding; the plan keeps to the budget; the block's weights are left as they were."""
    from dataclasses import replace

    from llmpress.quant.blockwise import BlockwiseOptions, learned_weights

    base = load_recipe("blockwise-w3g64")
    st = base.stages[0]
    base = replace(base, stages=(replace(st, config=replace(st.config, iters=6, windows_per_step=2)),))
    data = random_windows(4, 32)
    kw = {"base": base, "candidates": "w2g32,w3g32,w8g32", "budget": 3.25, "weighting": "none"}
    m = tiny_llama()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    learned = plan_bits(m, data, **kw, solver="blockwise")
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    rtn = plan_bits(tiny_llama(), data, **kw, solver="rtn")
    assert learned.bits_per_weight <= 3.25
    assert learned.uniform["w8g32"][1] == pytest.approx(rtn.uniform["w8g32"][1])
    assert learned.uniform["w2g32"][1] != pytest.approx(rtn.uniform["w2g32"][1], rel=1e-6)
    block = m.model.layers[0]
    xs = [torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))]
    pos = torch.arange(8).unsqueeze(0).expand(2, 8)
    rope = m.model.rotary_emb(xs[0], pos)
    calls = [((), {"position_embeddings": rope, "attention_mask": None})]
    with torch.no_grad():
        ys = [block(xs[0], **calls[0][1])]
        ys = [y[0] if isinstance(y, tuple) else y for y in ys]
    args = QuantArgs(bits=2, group_size=32)
    w = learned_weights(block, ["mlp.down_proj"], args, xs, calls, ys, BlockwiseOptions(iters=4, windows_per_step=2))["mlp.down_proj"]
    assert w.shape == block.mlp.down_proj.weight.shape and not torch.equal(w, block.mlp.down_proj.weight)
    groups = w.reshape(w.shape[0], -1, 32).reshape(-1, 32)
    assert max(len(torch.unique(g)) for g in groups) <= 4  # on a 2-bit grid per group
