"""Kept outlier weights: exact top fraction, dense + sparse split, honest bits accounting."""

import torch
from conftest import random_windows, tiny_llama

from llmpress import compress, stage
from llmpress.eval.size import model_size
from llmpress.quant import QuantArgs, fake_quantize
from llmpress.quant.outliers import csr_extra_bits, outlier_scores, split_outliers, top_fraction_mask
from llmpress.registry import ModuleRecord

W3 = QuantArgs(bits=3, group_size=16)


def _weight():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[2, 5], w[6, 40] = 9.0, -7.0
    return w


def test_top_fraction_exact_and_scores():
    w = _weight()
    s = outlier_scores(w, W3, torch.ones(64), "activation")
    m = top_fraction_mask(s, 2 / 512)
    assert int(m.sum()) == 2 and m[2, 5] and m[6, 40]
    q = outlier_scores(w, W3, torch.full((64,), 2.0), "quant_error")
    assert torch.allclose(q, (w - fake_quantize(w, W3)).pow(2) * 4.0)
    assert torch.equal(outlier_scores(w, W3, None, "magnitude"), w.abs())


def test_split_dense_plus_sparse():
    w = _weight()
    keep = top_fraction_mask(w.abs(), 4 / 512)
    dense, qp, sparse = split_outliers(w, W3, keep)
    assert (dense[keep] == 0).all()
    eff = dense + sparse.to_dense().float()
    assert torch.equal(eff[keep], w.half().float()[keep])
    assert sparse.layout == torch.sparse_csr and sparse._nnz() == 4
    # removing the outliers from the grid shrinks their groups' scales: less error elsewhere
    err_plain = (fake_quantize(w, W3) - w)[~keep].pow(2).sum()
    assert (eff - w)[~keep].pow(2).sum() < err_plain


def test_extra_bits_in_record_and_model_size():
    assert csr_extra_bits(10, 8) == 10 * 32 + 9 * 32
    r = ModuleRecord(name="x", out_features=8, in_features=64, weight_args=W3)
    base = r.bits_per_weight()
    r.notes["extra_bits"] = 512
    assert abs(r.bits_per_weight() - (base + 1.0)) < 1e-12


def test_outliers_method_end_to_end():
    m = tiny_llama()
    args = QuantArgs(bits=3, group_size=32)
    rep = compress(m, [stage("outliers", weights=args, fraction=0.01)], random_windows(8, 24))
    layer = rep.layers["model.layers.0.mlp.down_proj"]
    nnz = layer["outliers"]["nnz"]
    assert nnz == round(0.01 * 64 * 128)
    assert layer["extra_bits"] == csr_extra_bits(nnz, 64)
    expect = 3 + 16 / 32 + csr_extra_bits(nnz, 64) / (64 * 128)
    assert abs(layer["bits_per_weight"] - round(expect, 4)) < 1e-4
    size = model_size(m, rep.result.records)
    assert size["bits_per_weight"] > 3.5  # the sparse part is counted
    assert abs(size["bits_per_weight"] - rep.bits_per_weight) < 1e-12
