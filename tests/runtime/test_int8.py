"""W8A8 runtime: exact integer GEMM backends, Int8Linear vs fake-quant and float, conversion."""

import warnings

import pytest
import torch
import torch.nn as nn
from conftest import random_windows, tiny_llama
from helpers import rel_err

from llmpress import compress, stage
from llmpress.quant import QuantArgs
from llmpress.runtime import int8 as int8_mod
from llmpress.runtime.act_quant import ActQuantLinear
from llmpress.runtime.int8 import Int8Linear, convert_to_int8, int8_mm, quantize_rows

W8 = QuantArgs(bits=8, granularity="channel")
A8 = QuantArgs(bits=8, granularity="token")


@pytest.mark.parametrize("shape", [(5, 7, 3), (32, 64, 48), (17, 2048, 24)])
@pytest.mark.parametrize("backend", ["int_mm", "int32", "fp32_exact", "auto"])
def test_int8_mm_exact(shape, backend):
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g).t()  # column-major, like a weight
    if K == 2048:  # worst case for float accumulation: every product is 2^14
        a.fill_(-128)
        b = torch.full((N, K), -128, dtype=torch.int8).t()
    ref = a.to(torch.int64) @ b.to(torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = int8_mm(a, b, backend)
    assert out.dtype == torch.int32
    assert torch.equal(out.to(torch.int64), ref)


def test_int_mm_failure_falls_back_with_warning(monkeypatch):
    def broken(a, b):
        raise RuntimeError("shape not supported")

    monkeypatch.setattr(torch, "_int_mm", broken)
    monkeypatch.setattr(int8_mod, "_state", {})
    a = torch.randint(-5, 5, (3, 8), dtype=torch.int8)
    b = torch.randint(-5, 5, (8, 4), dtype=torch.int8)
    with pytest.warns(RuntimeWarning, match="int32"):
        out = int8_mm(a, b, "int_mm")
    assert torch.equal(out, a.int() @ b.int())


def test_quantize_rows_matches_fake_quant():
    torch.manual_seed(0)
    x = torch.randn(10, 33) * torch.rand(10, 1) * 10
    codes, s = quantize_rows(x)
    from llmpress.quant import fake_quantize

    assert torch.allclose(codes.float() * s, fake_quantize(x, A8), atol=1e-6)


@pytest.mark.parametrize("backend,rows", [("int_mm", 20), ("fp32_exact", 20), ("auto", 2)])
def test_int8_linear_close_to_fake_quant_and_float(backend, rows):
    """auto with 2 rows per call: the decode path (llmpress's int8 GEMV kernel where it builds)."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    x = torch.randn(3, rows, 96)
    ref = lin(x)
    q = Int8Linear.from_linear(lin, backend=backend)
    y = q(x)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-2
    fq = nn.Linear(96, 40)
    fq.load_state_dict(lin.state_dict())
    fq.weight.data = q.dequantized_weight()
    yf = ActQuantLinear(fq, A8)(x)
    assert torch.allclose(y, yf, rtol=1e-4, atol=1e-5)
    assert q.weight_codes.dtype == torch.int8


def test_convert_rtn_w8a8_model():
    m = tiny_llama()
    rep = compress(m, [stage("rtn", weights=W8, activations=A8)])
    ids = random_windows(2, 24, seed=1)
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    names = convert_to_int8(m, backend="fp32_exact", records=rep.result.records)
    assert len(names) == 14 and all(isinstance(m.get_submodule(n), Int8Linear) for n in names)
    with torch.no_grad():
        y = m(input_ids=ids).logits
    # same integers; float rescale order differs, so a rare rounding tie in a later layer flips
    assert rel_err(y, ref) < 1e-3


def test_convert_all_linears_of_float_model():
    m = tiny_llama()
    names = convert_to_int8(m, all_linears=True)
    assert len(names) == 14 and "lm_head" not in names


def test_clipped_or_searched_activation_grids_stay_fake_quantized():
    assert int8_mod._is_a8_token(QuantArgs(bits=8, granularity="token"))
    for kw in (dict(clip_ratio=0.9), dict(observer="mse"), dict(full_range=True), dict(bits=4), dict(symmetric=False)):
        assert not int8_mod._is_a8_token(QuantArgs(**{"bits": 8, "granularity": "token", **kw}))
