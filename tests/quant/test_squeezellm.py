"""Non-uniform codebook quantization (quant/nuq.py, the squeezellm method), its storage form
``codebook`` and runtime module: exact tables and codes, dense-and-sparse, GPTQ onto tables,
byte accounting, checkpoint round trip, refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama, tiny_tokenizer
from helpers import QUIET, logits

from llmpress import api, compress, load_compressed, stage
from llmpress.errors import RecipeError, UserError
from llmpress.quant.hessian import layer_error
from llmpress.quant.nuq import codebook_bits, column_sensitivity, csr_bits, lookup, nuq_gptq, nuq_round, weight_sensitivity
from llmpress.quant.squeezellm import SqueezeLLM
from llmpress.registry import ModuleRecord
from llmpress.runtime.lut_linear import LutLinear
from llmpress.storage.form import LinearSpec, encode_layer, get_form


def _problem(R=16, C=64, tokens=256, seed=0):
    """A weight and the Hessian of correlated inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C, generator=g) * 0.05
    mix = torch.randn(C, C, generator=g) * 0.3 + torch.eye(C)
    X = torch.randn(tokens, C, generator=g) @ mix * (torch.rand(C, generator=g) * 2 + 0.1)
    return W, 2 / tokens * X.t() @ X


def _nearest_ok(res, w):
    """Every non-kept weight sits at its nearest table entry."""
    q = lookup(res.table, res.codes)
    R, G, K = res.table.shape
    tab = res.table.float().repeat_interleave(w.shape[1] // G, dim=1)  # [R, C, K]
    best = (w.unsqueeze(2) - tab).abs().min(2).values
    return bool(((w - q).abs() <= best + 1e-7).all())


@pytest.mark.parametrize("group_size", [None, 16])
def test_round_tables_codes_and_weight(group_size):
    W, H = _problem()
    s = column_sensitivity(H, "hessian_diag", 64)
    res = nuq_round(W, 3, group_size=group_size, col_weights=s)
    G = 1 if group_size is None else 64 // group_size
    assert res.table.shape == (16, G, 8) and res.table.dtype == torch.float16 and res.codes.dtype == torch.uint8
    assert torch.equal(res.weight, lookup(res.table, res.codes)) and res.outliers.numel() == 0
    assert _nearest_ok(res, W)
    # the weighted k-means beats the plain one on the weighted error, and both beat a 3-bit min-max grid per row
    plain = nuq_round(W, 3, group_size=group_size)
    d = torch.diagonal(H)
    werr = lambda q: float(((W - q).pow(2) * d).sum())  # noqa: E731
    assert werr(res.weight) < werr(plain.weight)
    lo, hi = W.min(1, keepdim=True).values, W.max(1, keepdim=True).values
    grid = lo + torch.round((W - lo) / (hi - lo) * 7) * (hi - lo) / 7
    assert float((W - plain.weight).pow(2).sum()) < float((W - grid).pow(2).sum())


def test_dense_and_sparse_keeps_the_worst_weights_in_fp16():
    W, H = _problem()
    W[3, 7], W[9, 50] = 1.5, -2.0
    s = column_sensitivity(H, "hessian_diag", 64)
    res = nuq_round(W, 2, col_weights=s, outlier_fraction=4 / W.numel())
    assert res.outliers.tolist() == sorted(res.outliers.tolist()) and res.outliers.numel() == 4
    assert {3 * 64 + 7, 9 * 64 + 50} <= set(res.outliers.tolist())
    kept = torch.zeros(W.numel(), dtype=torch.bool)
    kept[res.outliers] = True
    kept = kept.reshape(W.shape)
    assert torch.equal(res.weight[kept], W[kept].half().float())
    # the tables no longer stretch to the outliers: the rest is closer
    plain = nuq_round(W, 2, col_weights=s)
    d = torch.diagonal(H)
    assert float(((W - res.weight).pow(2) * d)[~kept].sum()) < float(((W - plain.weight).pow(2) * d)[~kept].sum())


def test_gptq_onto_tables_lowers_the_layer_error():
    W, H = _problem(R=24, C=64, tokens=512, seed=1)
    s = column_sensitivity(H, "hessian_diag", 64)
    rnd = nuq_round(W, 3, col_weights=s)
    for act_order in (False, True):
        gp = nuq_gptq(W, H, 3, col_weights=s, damp=0.01, act_order=act_order)
        assert torch.equal(gp.table, rnd.table)  # the same tables, fitted first
        assert torch.equal(gp.weight, lookup(gp.table, gp.codes))  # every weight on its row's table
        assert layer_error(W, gp.weight, H) < 0.8 * layer_error(W, rnd.weight, H)
    sparse = nuq_gptq(W, H, 3, col_weights=s, outlier_fraction=0.01)
    kept = torch.zeros(W.numel(), dtype=torch.bool)
    kept[sparse.outliers] = True
    q = lookup(sparse.table, sparse.codes).reshape(-1)
    assert torch.equal(sparse.weight.reshape(-1)[~kept], q[~kept])
    assert torch.equal(sparse.weight.reshape(-1)[kept], sparse.weight.reshape(-1)[kept].half().float())


def _record(res, R, C):
    rec = ModuleRecord(name="l", out_features=R, in_features=C, form="codebook")
    rec.payload = {"codes": res.codes, "table": res.table, **({"exc_index": res.outliers} if res.outliers.numel() else {})}
    return rec


@pytest.mark.parametrize("bits,group_size,fraction", [(3, None, 0.0), (4, 32, 0.0), (2, None, 0.01), (3, 16, 0.02)])
def test_form_encodes_bit_for_bit_and_counts_every_byte(bits, group_size, fraction):
    W, H = _problem(R=12, C=64)
    res = nuq_round(W, bits, group_size=group_size, col_weights=column_sensitivity(H, "hessian_diag", 64), outlier_fraction=fraction)
    rec = _record(res, 12, 64)
    spec, tensors = encode_layer(res.weight, rec)
    form = get_form("codebook")
    assert spec.kind == "codebook" and spec.meta == {"bits": bits, "groups": 1 if group_size is None else 64 // group_size}
    assert torch.equal(form.decode(spec, tensors), res.weight)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == spec.expected_shapes()
    nnz = res.outliers.numel()
    assert spec.n_exceptions == nnz
    G = spec.meta["groups"]
    bits_total = codebook_bits(12, 64, bits, G, nnz)
    assert bits_total == 12 * 64 * bits + 12 * G * 2**bits * 16 + csr_bits(nnz, 12)
    assert rec.bits_per_weight() == pytest.approx(bits_total / (12 * 64))
    nbytes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    assert 8 * sum(nbytes.values()) == bits_total  # 64 columns: whole words, the checkpoint holds exactly what is counted
    assert form.stored_bits(spec, nbytes, 16) == bits_total
    back = LinearSpec.from_dict(spec.to_dict(), "layers.l")
    assert back.meta == spec.meta and back.n_exceptions == nnz
    mod = form.build(back, tensors, backend="dequant")  # the exact module (tests/runtime/test_lut_kernel.py: the kernel)
    x = torch.randn(5, 64)
    assert isinstance(mod, LutLinear) and torch.equal(mod(x), torch.nn.functional.linear(x, res.weight))
    assert form.payload(back, tensors)["table"].shape == res.table.shape


def test_a_weight_changed_after_quantization_is_not_encoded():
    W, _ = _problem(R=4, C=32)
    res = nuq_round(W, 2)
    changed = res.weight.clone()
    changed[0, 0] += 1e-3
    assert encode_layer(changed, _record(res, 4, 32)) is None


def test_bad_specs_are_refused():
    base = {"kind": "codebook", "shape": [4, 32], "weights": None}
    with pytest.raises(UserError, match="meta.bits in 1..8"):
        LinearSpec.from_dict({**base, "meta": {"bits": 9, "groups": 1}}, "layers.x")
    with pytest.raises(UserError, match="meta.groups dividing its 32"):
        LinearSpec.from_dict({**base, "meta": {"bits": 2, "groups": 3}}, "layers.x")


@pytest.mark.parametrize("solver,make", [("round", tiny_llama), ("gptq", tiny_llama), ("gptq", tiny_gemma3)])
def test_compress_save_load_same_logits(tmp_path, solver, make):
    model = make()
    ids = random_windows(8, 32)
    st = stage("squeezellm", targets=["Linear"], ignore=["lm_head"], bits=3, outlier_fraction=0.005, solver=solver)
    rep = compress(model, [st], data=ids, engine=QUIET)
    rec = rep.result.records["model.layers.0.mlp.down_proj"]
    R, C = rec.out_features, rec.in_features
    nnz = round(0.005 * R * C)
    assert rec.form == "codebook" and rec.notes["outliers"]["nnz"] == nnz
    assert rec.bits_per_weight() == pytest.approx(codebook_bits(R, C, 3, 1, nnz) / (R * C))
    expected = logits(model, ids[:2])
    api.save(model, tiny_tokenizer(), tmp_path / "c", report=rep)
    back, _ = load_compressed(str(tmp_path / "c"), backend="dequant")
    mod = back.model.layers[0].mlp.down_proj
    assert isinstance(mod, LutLinear) and mod.exc_index.numel() == nnz
    assert torch.equal(logits(back, ids[:2]), expected)
    fast, _ = load_compressed(str(tmp_path / "c"))  # the lookup-table kernel where it builds: equal up to summation order
    assert torch.allclose(logits(fast, ids[:2]), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    loaded = back.llmpress_records["model.layers.0.mlp.down_proj"]
    assert loaded.bits_per_weight() == pytest.approx(rec.bits_per_weight())
    # no compressed-tensors or GGUF form: refused, naming the layer
    from llmpress.export.compressed_tensors import export_compressed_tensors

    with pytest.raises(UserError, match=r"layer model\.layers\.\d\.\S+: storage form 'codebook'"):
        export_compressed_tensors(tmp_path / "c", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_config_and_layer_refusals():
    for kw, msg in [
        ({"bits": 9}, "1 to 8 bits"),
        ({"bits": 0}, "1 to 8 bits"),
        ({"group_size": 4, "bits": 3}, "at least 2.bits = 8 weights"),
        ({"sensitivity": "hutchinson"}, "sensitivity='hutchinson'"),
        ({"outlier_fraction": 0.2}, "outlier_fraction=0.2"),
        ({"solver": "obq"}, "solver='obq'"),
    ]:
        with pytest.raises(RecipeError, match=msg):
            SqueezeLLM(**kw)
    model = tiny_llama()
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(UserError, match=r"layer model\.layers\.0\.self_attn\.q_proj: group_size 48 does not divide the input dimension 64"):
        compress(model, [stage("squeezellm", targets=["Linear"], ignore=["lm_head"], group_size=48)], data=random_windows(4, 16), engine=QUIET)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    with pytest.raises(UserError, match="8 bits = 256 table entries for rows of 64 weights"):
        compress(model, [stage("squeezellm", targets=["Linear"], ignore=["lm_head"], bits=8)], data=random_windows(4, 16), engine=QUIET)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)


def test_per_weight_sensitivity_pulls_the_tables_toward_important_weights():
    """Fisher-weighted k-means ([R, C] weights): a weight given a large importance ends up
    nearer its entry than with the column (H-diagonal) weights, rows alike otherwise."""
    W, H = _problem()
    col = column_sensitivity(H, "hessian_diag", 64)
    imp = col.expand(16, 64).clone()
    hot = torch.zeros(16, 64, dtype=torch.bool)
    hot[torch.arange(16), torch.arange(16) * 3] = True  # one weight per row
    imp[hot] *= 1e4
    base = nuq_round(W, 2, col_weights=col)
    fisher = nuq_round(W, 2, col_weights=weight_sensitivity(imp))
    err = lambda r: (r.weight - W).abs()  # noqa: E731
    assert float(err(fisher)[hot].mean()) < 0.2 * float(err(base)[hot].mean())
    assert _nearest_ok(fisher, W)
    # zeros count as rare, not free; a non-finite score is refused
    z = weight_sensitivity(torch.tensor([[0.0, 2.0], [4.0, 0.0]]))
    assert torch.allclose(z, torch.tensor([[3e-3, 2.0], [4.0, 3e-3]]))
    with pytest.raises(UserError, match="non-finite"):
        weight_sensitivity(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(UserError, match="per weight"):
        column_sensitivity(H, "fisher", 64)


def test_fisher_sensitivity_reads_weight_importance_and_is_refused_without_it():
    lin = dict(targets=["Linear"], ignore=["lm_head"])
    data = random_windows(8, 16)
    outs = {}
    for sens in ("fisher", "hessian_diag"):
        model = tiny_llama()
        sts = [stage("weight_importance", windows=4, **lin)] if sens == "fisher" else []
        rep = compress(model, [*sts, stage("squeezellm", bits=2, sensitivity=sens, **lin)], data=data, engine=QUIET)
        rec = rep.result.records["model.layers.0.mlp.down_proj"]
        assert rec.form == "codebook" and rec.notes["sensitivity"] == sens
        outs[sens] = rec.payload["table"].float()
    assert not torch.allclose(outs["fisher"], outs["hessian_diag"])  # other weights, other tables
    model = tiny_llama()
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(UserError, match=r"stage 0 \(squeezellm\) needs a weight_importance stage before it"):
        compress(model, [stage("squeezellm", bits=2, sensitivity="fisher", **lin)], data=data, engine=QUIET)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
