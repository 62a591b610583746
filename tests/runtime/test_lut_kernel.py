"""The lookup-table CPU kernel (runtime/csrc/lowbit_cpu.cpp ``lut4_mm`` / ``lut4_dequant``) and
its module (runtime/lut_linear.py ``LowbitLutLinear``): the dequantized weight bit for bit,
products equal to table-lookup-then-multiply up to summation order, across shapes, bits,
groups, batch sizes and kept weights; the module the ``codebook`` form builds."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_max_err

from llmpress.quant.nuq import nuq_round
from llmpress.registry import ModuleRecord
from llmpress.runtime import cpu_kernels
from llmpress.runtime.lut_linear import LowbitLutLinear, LutLinear, lut_weight
from llmpress.storage.form import encode_layer, get_form
from llmpress.storage.grid import pack_unsigned

pytestmark = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None, reason=str(cpu_kernels.unavailable_reason()))


def _layer(R, C, bits, group_size, fraction, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C, generator=g) * 0.05
    res = nuq_round(W, bits, group_size=group_size, outlier_fraction=fraction)
    flat = res.outliers if res.outliers.numel() else None
    return res, flat, None if flat is None else res.weight.reshape(-1)[flat].half()


@pytest.mark.parametrize(
    "R,C,bits,group_size,fraction", [(96, 576, 4, None, 0.0), (40, 128, 3, 32, 0.01), (17, 64, 2, None, 0.02), (33, 1536, 4, 64, 0.005)]
)
@pytest.mark.parametrize("avx512", [False, True])
def test_kernel_equals_lookup_then_multiply(ext, R, C, bits, group_size, fraction, avx512):
    if avx512 and not ext.lut_avx512():
        pytest.skip("no AVX-512 on this CPU")
    res, flat, vals = _layer(R, C, bits, group_size, fraction)
    mod = LowbitLutLinear(res.codes, res.table, exc_index=flat, exc_value=vals, bias=torch.randn(R), avx512=avx512)
    ref = LutLinear(res.codes, res.table, exc_index=flat, exc_value=vals, bias=mod.bias)
    assert torch.equal(mod.dequantized_weight(), res.weight) and torch.equal(ref.dequantized_weight(), res.weight)
    for M in (1, 2, 3, 4, 5, 8, 9, 16):
        x = torch.randn(M, C, generator=torch.Generator().manual_seed(M))
        want = ref(x)
        got = mod(x)
        assert got.shape == want.shape and rel_max_err(got, want) < 1e-5, (M, rel_max_err(got, want))
    x3 = torch.randn(2, 3, C)  # leading dimensions kept
    assert rel_max_err(mod(x3), ref(x3)) < 1e-5 and mod(x3).shape == (2, 3, R)


def test_raw_kernel_against_a_dense_product(ext):
    g = torch.Generator().manual_seed(3)
    N, K, gs = 24, 256, 64
    codes = torch.randint(0, 16, (N, K), generator=g)
    table = torch.randn(N, K // gs, 16, generator=g)
    packed = pack_unsigned(codes, 4)
    dense = table.reshape(N, -1).gather(1, codes + (torch.arange(K) // gs * 16))
    assert torch.equal(ext.lut4_dequant(packed, table.contiguous(), gs, 0), dense)
    x = torch.randn(3, K, generator=g)
    assert rel_max_err(ext.lut4_mm(x, packed, table.contiguous(), gs, 16, 0), x @ dense.t()) < 1e-5
    c8 = codes % 8  # at most 8 entries: the one-register path
    dense8 = table.reshape(N, -1).gather(1, c8 + (torch.arange(K) // gs * 16))
    assert rel_max_err(ext.lut4_mm(x, pack_unsigned(c8, 4), table.contiguous(), gs, 8, 0), x @ dense8.t()) < 1e-5
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ext.lut4_mm(x, packed, table.contiguous(), 48, 16, 0)


def test_the_form_builds_the_kernel_where_it_applies(ext):
    res, flat, _ = _layer(16, 64, 3, None, 0.02)
    rec = ModuleRecord(name="l", out_features=16, in_features=64, form="codebook")
    rec.payload = {"codes": res.codes, "table": res.table, "exc_index": res.outliers}
    spec, tensors = encode_layer(res.weight, rec)
    form = get_form("codebook")
    auto, exact = form.build(spec, tensors), form.build(spec, tensors, backend="dequant")
    assert isinstance(auto, LowbitLutLinear) and isinstance(exact, LutLinear)
    x = torch.randn(2, 64)
    assert torch.equal(exact(x), torch.nn.functional.linear(x, res.weight))
    assert rel_max_err(auto(x), exact(x)) < 1e-5
    assert torch.equal(lut_weight(res.codes, res.table, flat, res.weight.reshape(-1)[flat]), res.weight)
    # 32 entries (5 bits) or a group of 48 columns: the dequantizing module
    res5, _, _ = _layer(8, 96, 5, None, 0.0)
    rec.payload = {"codes": res5.codes, "table": res5.table}
    rec.out_features, rec.in_features = 8, 96
    spec5, t5 = encode_layer(res5.weight, rec)
    assert isinstance(form.build(spec5, t5), LutLinear)
