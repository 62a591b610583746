"""Vector quantization (quant/vq.py, the gptvq method), its storage form ``vq`` and runtime
module: error feedback against nearest-codeword assignment, table refinement, byte accounting,
checkpoint round trip, refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama, tiny_tokenizer
from helpers import QUIET, logits

from llmpress import api, compress, load_compressed, stage
from llmpress.errors import RecipeError, UserError
from llmpress.quant.gptvq import GPTVQ
from llmpress.quant.hessian import layer_error
from llmpress.quant.vq import assign, auto_group_size, dequantize_tables, kmeans_vq, quantize_tables, vq_bits, vq_gptq, vq_lookup, vq_round
from llmpress.registry import ModuleRecord
from llmpress.runtime import cpu_kernels
from llmpress.runtime.vq_linear import LowbitVQLinear, VQLinear
from llmpress.storage.form import LinearSpec, encode_layer, get_form


def _problem(R=32, C=128, tokens=1024, seed=0):
    """A weight and the Hessian of correlated inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C, generator=g) * 0.05
    mix = torch.randn(C, C, generator=g) * 0.3 + torch.eye(C)
    X = torch.randn(tokens, C, generator=g) @ mix * (torch.rand(C, generator=g) * 2 + 0.1)
    return W, 2 / tokens * X.t() @ X


def test_lookup_reads_each_vector_from_its_group_table():
    table = torch.arange(2 * 4 * 2, dtype=torch.float16).reshape(2, 4, 2)  # G=2 tables of 4 pairs
    codes = torch.tensor([[0, 3, 1, 2], [2, 2, 0, 1]])  # 8 columns: vectors 0-1 in group 0, 2-3 in group 1
    w = vq_lookup(table, codes)
    assert w.tolist() == [[0, 1, 6, 7, 10, 11, 12, 13], [4, 5, 4, 5, 8, 9, 10, 11]]


def test_weighted_kmeans_recovers_clusters_and_assigns_nearest():
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    x = centres.repeat(50, 1) + 0.05 * torch.randn(200, 2, generator=g)
    c = kmeans_vq(x, 4, torch.ones_like(x), iters=50, seed=1)
    assert torch.allclose(c[assign(centres, c)], centres, atol=0.03)
    # weighting one coordinate to zero: the nearest codeword ignores it
    cb = torch.tensor([[0.0, 5.0], [1.0, -5.0]])
    assert assign(torch.tensor([[0.9, 4.0]]), cb, torch.tensor([[1.0, 0.0]])).item() == 1
    assert assign(torch.tensor([[0.9, 4.0]]), cb).item() == 0


@pytest.mark.parametrize("dim,bits,row_scale", [(2, 2, False), (2, 3, False), (4, 2, False), (2, 2, True), (4, 2, True)])
def test_error_feedback_beats_nearest_codeword_and_refinement_lowers_it(dim, bits, row_scale):
    W, H = _problem(R=128, seed=dim + bits)
    if row_scale:  # rows of uneven scale
        W = W * torch.exp(torch.randn(128, 1, generator=torch.Generator().manual_seed(9)))
    rnd = vq_round(W, H, dim, bits, group_size=64, row_scale=row_scale)
    assert rnd.table.shape == (2, 2 ** (dim * bits), dim) and rnd.table.dtype == torch.float16
    assert torch.equal(rnd.weight, vq_lookup(rnd.table, rnd.codes, rnd.scale)) and (rnd.scale is not None) == row_scale
    fb = vq_gptq(W, H, dim, bits, group_size=64, table=rnd.table, refine_iters=0, row_scale=row_scale)
    assert torch.equal(fb.table, rnd.table) and torch.equal(fb.weight, vq_lookup(fb.table, fb.codes, fb.scale))
    e_rnd, e_fb = layer_error(W, rnd.weight, H), layer_error(W, fb.weight, H)
    assert fb.loss == pytest.approx(e_fb, rel=1e-6)
    assert e_fb < 0.9 * e_rnd
    ref = vq_gptq(W, H, dim, bits, group_size=64, table=rnd.table, refine_iters=10, row_scale=row_scale)
    assert torch.equal(ref.codes, fb.codes) and torch.equal(ref.weight, vq_lookup(ref.table, ref.codes, ref.scale))
    assert layer_error(W, ref.weight, H) < e_fb


@pytest.mark.parametrize("dim,group_size", [(2, 64), (4, None)])
def test_em_rounds_reassign_on_refined_tables_and_never_raise_the_error(dim, group_size):
    W, H = _problem(R=128, seed=11)
    W = W * torch.exp(torch.randn(128, 1, generator=torch.Generator().manual_seed(2)) * 0.5)
    one = vq_gptq(W, H, dim, 2, group_size=group_size, row_scale=True)
    three = vq_gptq(W, H, dim, 2, group_size=group_size, row_scale=True, em_rounds=3)
    # round 2 sweeps on round 1's refined tables: the codes move
    two_manual = vq_gptq(W, H, dim, 2, group_size=group_size, row_scale=True, table=one.table)
    assert not torch.equal(two_manual.codes, one.codes)
    e1, e3 = layer_error(W, one.weight, H), layer_error(W, three.weight, H)
    assert three.loss == pytest.approx(e3, rel=1e-6) and e3 < 0.995 * e1  # the later rounds did run and help
    assert e3 <= layer_error(W, two_manual.weight, H) + 1e-9  # the kept round is the lowest seen
    assert torch.equal(three.weight, vq_lookup(three.table, three.codes, three.scale))


def test_row_scales_let_rows_of_uneven_scale_share_a_table():
    W, H = _problem(R=128, seed=4)
    W = W * torch.exp(torch.randn(128, 1, generator=torch.Generator().manual_seed(9)))
    plain = vq_gptq(W, H, 2, 2, group_size=64)
    scaled = vq_gptq(W, H, 2, 2, group_size=64, row_scale=True)
    assert torch.equal(scaled.scale, W.pow(2).mean(1).sqrt().half())
    assert layer_error(W, scaled.weight, H) < 0.8 * layer_error(W, plain.weight, H)
    whole = vq_gptq(W, H, 4, 2, group_size=None, row_scale=True, refine_iters=2)  # one table for the layer
    assert whole.table.shape == (1, 256, 4) and torch.equal(whole.weight, vq_lookup(whole.table, whole.codes, whole.scale))


def _record(res, R, C):
    rec = ModuleRecord(name="l", out_features=R, in_features=C, form="vq")
    rec.payload = {"codes": res.codes, "table": res.table, "row_groups": res.row_groups, **({"scale": res.scale} if res.scale is not None else {})}
    if res.table_q is not None:
        rec.payload.update(table_q=res.table_q, table_scale=res.table_scale)
    return rec


def test_int8_tables_round_trip_and_cost_half():
    g = torch.Generator().manual_seed(7)
    t = torch.randn(3, 16, 2, generator=g) * torch.tensor([0.01, 1.0, 30.0])[:, None, None]
    q, s, deq = quantize_tables(t)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (3,)
    assert torch.equal(deq, dequantize_tables(q, s)) and int(q.abs().max()) == 127
    assert bool(((deq - t).abs() <= s.float()[:, None, None] * 0.5 + 1e-6 * t.abs()).all())  # half a step, per table
    q2, s2, deq2 = quantize_tables(deq)  # idempotent: a rounded table stays as it is
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(deq2, deq)
    assert torch.equal(quantize_tables(torch.zeros(1, 4, 2))[2], torch.zeros(1, 4, 2))
    W, H = _problem(R=64, C=128, seed=3)
    f16 = vq_gptq(W, H, 2, 2, group_size=32, row_scale=True)
    i8 = vq_gptq(W, H, 2, 2, group_size=32, row_scale=True, table_bits=8)
    assert f16.table_q is None and i8.table.dtype == torch.float32
    assert torch.equal(i8.table, dequantize_tables(i8.table_q, i8.table_scale))
    assert torch.equal(i8.weight, vq_lookup(i8.table, i8.codes, i8.scale))
    assert layer_error(W, i8.weight, H) < 1.05 * layer_error(W, f16.weight, H)
    G = 128 // 32
    assert vq_bits(64, 128, 2, 2, G, True) - vq_bits(64, 128, 2, 2, G, True, table_bits=8) == G * (16 * 2 * 8 - 16)
    with pytest.raises(UserError, match="table_bits=4"):
        vq_gptq(W, H, 2, 2, group_size=32, table_bits=4)


@pytest.mark.parametrize(
    "dim,bits,group_size,row_scale,tb",
    [(2, 2, 64, False, 16), (2, 3, 128, True, 16), (4, 2, 128, False, 16), (8, 1, 128, True, 16), (2, 2, 64, True, 8)],
)
def test_form_encodes_bit_for_bit_and_counts_every_byte(dim, bits, group_size, row_scale, tb):
    R, C = 24, 256
    W, H = _problem(R=R, C=C)
    res = vq_gptq(W, H, dim, bits, group_size=group_size, refine_iters=2, row_scale=row_scale, table_bits=tb)
    rec = _record(res, R, C)
    spec, tensors = encode_layer(res.weight, rec)
    form = get_form("vq")
    G = C // group_size
    extra = {"table_bits": 8} if tb == 8 else {}
    assert spec.kind == "vq" and spec.meta == {"dim": dim, "bits": bits, "groups": G, **({"row_scale": True} if row_scale else {}), **extra}
    assert torch.equal(form.decode(spec, tensors), res.weight)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == spec.expected_shapes()
    assert tensors["table"].dtype == (torch.int8 if tb == 8 else torch.float16)
    total = vq_bits(R, C, dim, bits, G, row_scale, table_bits=tb)
    assert total == R * C * bits + G * (2 ** (dim * bits) * dim * tb + (16 if tb == 8 else 0)) + (R * 16 if row_scale else 0)
    assert rec.bits_per_weight() == pytest.approx(total / (R * C))
    nbytes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    if (C // dim) % 32 == 0:
        assert 8 * sum(nbytes.values()) == total  # whole words: the checkpoint holds exactly what is counted
    assert form.stored_bits(spec, nbytes, 16) == total
    back = LinearSpec.from_dict(spec.to_dict(), "layers.l")
    mod = form.build(back, tensors)
    x = torch.randn(5, C)
    assert isinstance(mod, VQLinear) and torch.equal(mod(x), torch.nn.functional.linear(x, res.weight))
    assert torch.equal(form.payload(back, tensors)["codes"].long(), res.codes)
    assert ("scale" in form.payload(back, tensors)) == row_scale
    again = _record(res, R, C)  # re-encoding a loaded layer keeps its 8-bit tables
    again.payload = {**form.payload(back, tensors)}
    spec2, tensors2 = encode_layer(res.weight, again)
    assert spec2.meta == spec.meta and all(torch.equal(tensors2[k], tensors[k]) for k in tensors)


def test_a_weight_changed_after_quantization_is_not_encoded():
    W, H = _problem(R=8, C=64)
    res = vq_round(W, H, 2, 2, group_size=64)
    changed = res.weight.clone()
    changed[0, 0] += 1e-3
    assert encode_layer(changed, _record(res, 8, 64)) is None


def test_bad_input_is_refused():
    W, H = _problem(R=8, C=64)
    with pytest.raises(UserError, match="vector size 4 does not divide the group of 30 columns"):
        vq_gptq(W, H, 4, 2, group_size=30)
    with pytest.raises(UserError, match="bits=5: vector quantization takes 1 to 4 bits per weight"):
        vq_gptq(W, H, 2, 5, group_size=64)
    with pytest.raises(UserError, match="dim=3"):
        vq_round(W, H, 3, 2, group_size=63)
    with pytest.raises(UserError, match="256 codewords for groups of 128 vectors"):
        vq_gptq(W, H, 4, 2, group_size=64)
    for kw, msg in [
        ({"bits": 0}, "1 to 4 bits per weight"),
        ({"bits": 2.5}, "1 to 4 bits per weight"),
        ({"dim": 4, "bits": 4}, "2\\^16 codewords per table; at most 2\\^12"),
        ({"dim": 4, "group_size": 66}, "vector size 4 does not divide the group"),
        ({"refine_iters": -1}, "refine_iters=-1"),
        ({"row_scale": 1}, "row_scale=1"),
        ({"damp": -1.0}, "damp=-1.0"),
        ({"em_rounds": 0}, "em_rounds=0"),
        ({"em_rounds": True}, "em_rounds=True"),
        ({"table_bits": 4}, "table_bits=4"),
        ({"group_size": "auto", "table_budget": 0}, "table_budget=0"),
        ({"group_size": "wide"}, "group_size='wide'"),
    ]:
        with pytest.raises(RecipeError, match=msg):
            GPTVQ(**kw)
    base = {"kind": "vq", "shape": [4, 32], "weights": None}
    with pytest.raises(UserError, match="meta.dim in"):
        LinearSpec.from_dict({**base, "meta": {"dim": 3, "bits": 2, "groups": 1}}, "layers.x")
    with pytest.raises(UserError, match="meta.bits in 1..4"):
        LinearSpec.from_dict({**base, "meta": {"dim": 2, "bits": 7, "groups": 1}}, "layers.x")


def test_layer_refusal_changes_nothing():
    model = tiny_llama()
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(UserError, match=r"layer model\.layers\.0\.self_attn\.q_proj: group_size 48 does not divide the input dimension 64"):
        compress(model, [stage("gptvq", targets=["Linear"], ignore=["lm_head"], group_size=48)], data=random_windows(4, 16), engine=QUIET)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)


@pytest.mark.parametrize(
    "make,dim,bits,group_size,tb",
    [(tiny_llama, 2, 2, 32, 16), (tiny_llama, 2, 3, None, 16), (tiny_gemma3, 4, 1, 32, 16), (tiny_llama, 4, 2, None, 8)],
)
def test_compress_save_load_same_logits(tmp_path, make, dim, bits, group_size, tb):
    model = make()
    ids = random_windows(8, 32)
    st = stage("gptvq", targets=["Linear"], ignore=["lm_head"], dim=dim, bits=bits, group_size=group_size, refine_iters=3, table_bits=tb)
    rep = compress(model, [st], data=ids, engine=QUIET)
    name = "model.layers.0.mlp.down_proj"
    rec = rep.result.records[name]
    R, C = rec.out_features, rec.in_features
    assert rec.form == "vq" and rec.notes["dim"] == dim
    G = 1 if group_size is None else C // group_size
    assert rec.bits_per_weight() == pytest.approx(vq_bits(R, C, dim, bits, G, True, table_bits=tb) / (R * C))
    expected = logits(model, ids[:2])
    api.save(model, tiny_tokenizer(), tmp_path / "c", report=rep)
    back, _ = load_compressed(str(tmp_path / "c"), backend="dequant")
    mod = back.model.layers[0].mlp.down_proj
    assert isinstance(mod, VQLinear) and mod.table.shape == (G, 2 ** (dim * bits), dim) and mod.scale.shape == (R,)
    assert torch.equal(logits(back, ids[:2]), expected)
    assert back.llmpress_records[name].bits_per_weight() == pytest.approx(rec.bits_per_weight())
    # the default backend: llmpress's kernels where a layer has 16..256 codewords (and they build here)
    auto, _ = load_compressed(str(tmp_path / "c"))
    kernel = 4 <= dim * bits <= 8 and cpu_kernels.kernels() is not None
    assert isinstance(auto.model.layers[0].mlp.down_proj, LowbitVQLinear if kernel else VQLinear)
    got = logits(auto, ids[:2])
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    from llmpress.export.compressed_tensors import export_compressed_tensors

    with pytest.raises(UserError, match=r"layer model\.layers\.\d\.\S+: storage form 'vq'"):
        export_compressed_tensors(tmp_path / "c", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_row_groups_give_local_tables_lower_error_and_round_trip():
    """Tables per block of rows (row_group_size): rows of two very different kinds get their own
    codewords, a lower layer error than tables shared by all rows; the form stores
    ``meta.row_groups``, decodes bit for bit and counts every table."""
    g = torch.Generator().manual_seed(4)
    R, C = 32, 128
    W, H = _problem(R=R, C=C)
    W[16:] = torch.randn(16, C, generator=g).sign() * 0.08 + torch.randn(16, C, generator=g) * 0.01  # bimodal rows
    shared = vq_gptq(W, H, 2, 2, group_size=64, refine_iters=3)
    local = vq_gptq(W, H, 2, 2, group_size=64, refine_iters=3, row_group_size=16)
    assert local.row_groups == 2 and local.table.shape == (4, 16, 2) and shared.row_groups == 1
    assert local.loss < 0.8 * shared.loss
    assert torch.equal(vq_lookup(local.table, local.codes, local.scale, 2), local.weight)
    rec = _record(local, R, C)
    spec, tensors = encode_layer(local.weight, rec)
    form = get_form("vq")
    assert spec.meta["row_groups"] == 2 and spec.meta["groups"] == 4
    assert torch.equal(form.decode(spec, tensors), local.weight)
    nbytes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    assert form.stored_bits(spec, nbytes, 16) == vq_bits(R, C, 2, 2, 4, False) == R * C * 2 + 4 * 16 * 2 * 16
    back = LinearSpec.from_dict(spec.to_dict(), "layers.l")
    mod = form.build(back, tensors, backend="dequant")
    x = torch.randn(3, C)
    assert torch.equal(mod(x), torch.nn.functional.linear(x, local.weight))
    assert form.payload(back, tensors)["row_groups"] == 2
    with pytest.raises(UserError, match="row_group_size 12 does not divide the 32 output rows"):
        vq_gptq(W, H, 2, 2, group_size=64, row_group_size=12)
    with pytest.raises(UserError, match="256 codewords for groups of 128 vectors"):
        vq_gptq(W, H, 4, 2, group_size=128, row_group_size=4)
    with pytest.raises(RecipeError, match="row_group_size=0"):
        GPTVQ(row_group_size=0)
    with pytest.raises(UserError, match="meta.row_groups"):
        LinearSpec.from_dict(
            {"kind": "vq", "shape": [4, 32], "weights": None, "meta": {"dim": 2, "bits": 2, "groups": 3, "row_groups": 3}}, "layers.x"
        )


def test_row_groups_through_the_engine_and_the_checkpoint(tmp_path):
    model = tiny_llama()
    ids = random_windows(8, 32)
    st = stage("gptvq", targets=["Linear"], ignore=["lm_head"], dim=2, bits=2, group_size=32, row_group_size=32, refine_iters=2)
    rep = compress(model, [st], data=ids, engine=QUIET)
    rec = rep.result.records["model.layers.0.mlp.gate_proj"]  # 128 x 64: 4 row groups x 2 column groups
    assert rec.payload["table"].shape == (8, 16, 2) and rec.notes["row_group_size"] == 32
    assert rec.bits_per_weight() == pytest.approx(vq_bits(128, 64, 2, 2, 8, True) / (128 * 64))
    expected = logits(model, ids[:2])
    api.save(model, tiny_tokenizer(), tmp_path / "c", report=rep)
    exact, _ = load_compressed(str(tmp_path / "c"), backend="dequant")
    assert torch.equal(logits(exact, ids[:2]), expected)
    auto, _ = load_compressed(str(tmp_path / "c"))
    got = logits(auto, ids[:2])
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


def test_auto_group_size_spends_the_table_budget_on_any_width():
    # 4-d, 256 codewords, float16 tables: 16384 bits per table
    for R, C in ((576, 576), (192, 576), (1536, 576), (576, 1536), (640, 640), (256, 640)):
        for tb, budget in ((16, 0.1), (8, 0.1), (8, 0.25)):
            g = auto_group_size(R, C, 4, 2, table_bits=tb, budget=budget)
            per_table = 256 * 4 * tb + (16 if tb == 8 else 0)
            G = 1 if g is None else C // g
            assert g is None or (C % g == 0 and g % 4 == 0 and R * g // 4 >= 256)
            if g is not None:  # within the budget, and the next smaller valid group is not
                assert G * per_table <= budget * R * C
                smaller = [h for h in range(4, g, 4) if C % h == 0 and R * h // 4 >= 256]
                assert all((C // h) * per_table > budget * R * C for h in smaller)
    assert auto_group_size(576, 576, 4, 2, budget=0.1) == 288  # 2 tables: 0.099 bits; 3 (g192) would cost 0.148
    assert auto_group_size(576, 576, 4, 2, table_bits=8, budget=0.1) == 144  # 8-bit tables: 4 of them (0.099 bits)
    assert auto_group_size(192, 576, 4, 2, budget=0.1) is None  # k/v: one table is all the budget allows
    cfg = GPTVQ(dim=4, bits=2, group_size="auto", table_budget=0.1, table_bits=8)
    assert cfg.layer_group_size(576, 576) == 144 and cfg.layer_group_size(192, 576) is None and cfg.layer_group_size(1536, 576) == 64
    cfg.check_layer(192, 576, "k_proj")


def test_auto_groups_through_the_engine():
    model = tiny_llama()
    ids = random_windows(8, 32)
    rep = compress(
        model, [stage("gptvq", targets=["Linear"], ignore=["lm_head"], dim=2, bits=2, group_size="auto", table_budget=0.2)], data=ids, engine=QUIET
    )
    seen = False
    for rec in rep.result.records.values():
        if rec.form != "vq":
            continue
        g = rec.notes["group_size"]
        assert g == auto_group_size(rec.out_features, rec.in_features, 2, 2, budget=0.2)
        G = 1 if g is None else rec.in_features // g
        assert rec.bits_per_weight() == pytest.approx(vq_bits(rec.out_features, rec.in_features, 2, 2, G, True) / rec.n_params)
        if g is not None:  # a smaller group than the row: its tables within the budget
            assert rec.bits_per_weight() <= 2 + 0.2 + 16 / rec.in_features + 1e-9
            seen = True
    assert seen
