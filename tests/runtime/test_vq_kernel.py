"""The vector-quantization CPU kernel (runtime/csrc/vq_cpu.cpp ``vq16_mm``) and its module
(runtime/vq_linear.py ``LowbitVQLinear``): the packed layout round trip, products equal to
lookup-then-multiply up to summation order across shapes, vector sizes, groups, row scales and
batch sizes (AVX-512 and the scalar loop), and the module the ``vq`` form builds."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_max_err

from llmpress.quant.vq import vq_lookup, vq_round
from llmpress.registry import ModuleRecord
from llmpress.runtime import cpu_kernels
from llmpress.runtime.vq_linear import LowbitVQLinear, VQLinear, pack_vq8, pack_vq16, unpack_vq8, unpack_vq16
from llmpress.storage.form import encode_layer, get_form

pytestmark = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None, reason=str(cpu_kernels.unavailable_reason()))


def test_layout_round_trip_and_refusals():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 10), generator=g)
    packed = pack_vq16(codes)
    assert packed.shape == (3, 10, 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_vq16(packed), codes)
    assert int(packed[1, 4, 2]) == int(codes[16 + 2, 4]) | (int(codes[16 + 8 + 2, 4]) << 4)  # row j low nibble, row j + 8 high
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        pack_vq16(codes[:40])
    with pytest.raises(ValueError, match="0..15"):
        pack_vq16(codes + 16)
    wide = torch.randint(0, 256, (48, 10), generator=g)
    p8 = pack_vq8(wide)
    assert p8.shape == (3, 10, 16) and p8.dtype == torch.uint8 and torch.equal(unpack_vq8(p8), wide)
    assert int(p8[2, 7, 5]) == int(wide[32 + 5, 7])  # byte j of [block, vector] is row j's code
    with pytest.raises(ValueError, match="0..63"):
        pack_vq8(wide, 64)


@pytest.mark.parametrize(
    "R,C,dim,groups,row_groups,scaled",
    [
        (576, 576, 2, 9, 1, True),
        (64, 1536, 2, 24, 1, False),
        (32, 128, 4, 1, 1, True),
        (16, 96, 2, 3, 1, True),
        (96, 128, 2, 2, 3, True),
        (48, 192, 4, 3, 1, True),
        (64, 128, 8, 2, 2, False),
    ],
)
@pytest.mark.parametrize("avx512", [0, 1])
@pytest.mark.parametrize("K", [16, 64, 256])
def test_kernel_equals_lookup_then_multiply(ext, R, C, dim, groups, row_groups, scaled, avx512, K):
    if avx512 and not ext.vq16_avx512():
        pytest.skip("no AVX-512 on this CPU")
    g = torch.Generator().manual_seed(R + C + K)
    codes = torch.randint(0, K, (R, C // dim), generator=g)
    table = torch.randn(groups * row_groups, K, dim, generator=g).half()
    scale = (torch.rand(R, generator=g) + 0.5).half() if scaled else None
    bias = torch.randn(R, generator=g)
    mod = LowbitVQLinear(codes, table, scale=scale, bias=bias, row_groups=row_groups, avx512=avx512)
    assert mod.kernel == ("lowbit-vq16" if K == 16 else "lowbit-vq8")
    ref = VQLinear(codes, table, scale=scale, bias=bias, row_groups=row_groups)
    assert torch.equal(mod.dequantized_weight(), vq_lookup(table, codes, scale, row_groups))
    if row_groups > 1:  # each block of rows reads its own tables
        assert not torch.equal(
            ref.dequantized_weight(),
            VQLinear(codes, table[:groups].repeat(row_groups, 1, 1), scale=scale, row_groups=row_groups).dequantized_weight(),
        )
    assert mod.quad == (K != 16 and dim % 4 == 0 and avx512 == 1)
    assert mod.small_m == (8 if K != 16 and not mod.quad else 32)
    old = ext.vq_direct_from()
    try:  # the activation tables, then the direct path (one weight lookup shared by the rows), at every batch
        for direct_from in (10**6, 1):
            ext.vq_direct_from(direct_from, direct_from, direct_from)
            for M in (1, 2, 3, 4, 5, 8, 9, 13, 32, 33):  # 33: dequantize + GEMM
                x = torch.randn(M, C, generator=torch.Generator().manual_seed(M))
                got, want = mod(x), ref(x)
                assert got.shape == want.shape and rel_max_err(got, want) < 1e-5, (M, direct_from, rel_max_err(got, want))
    finally:
        ext.vq_direct_from(*old)
    x3 = torch.randn(2, 3, C)  # leading dimensions kept
    assert mod(x3).shape == (2, 3, R) and rel_max_err(mod(x3), ref(x3)) < 1e-5


def test_raw_kernel_refuses_mismatched_shapes(ext):
    codes = pack_vq16(torch.randint(0, 16, (16, 8)))
    tables = torch.randn(2, 2, 16)
    with pytest.raises(RuntimeError, match="float32 \\[M, 16\\]"):
        ext.vq16_mm(torch.randn(1, 12), codes, tables, torch.ones(16), 1, 0)
    with pytest.raises(RuntimeError, match="do not split into 3 groups"):
        ext.vq16_mm(torch.randn(1, 16), codes, torch.randn(3, 2, 16), torch.ones(16), 1, 0)
    with pytest.raises(RuntimeError, match="row_groups=3 must divide"):
        ext.vq16_mm(torch.randn(1, 16), codes, tables, torch.ones(16), 3, 0)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        ext.vq16_mm(torch.randn(1, 16), codes, tables, torch.ones(8), 1, 0)
    wide = pack_vq8(torch.randint(0, 64, (16, 8)), 64)
    with pytest.raises(RuntimeError, match="takes 16..256 in steps of 16"):
        ext.vq8_mm(torch.randn(1, 16), wide, torch.randn(1, 2, 24), torch.ones(16), 1, 0)
    with pytest.raises(RuntimeError, match="uint8 \\[N/16, V, 16\\]"):
        ext.vq8_mm(torch.randn(1, 16), codes, torch.randn(1, 2, 64), torch.ones(16), 1, 0)
    with pytest.raises(RuntimeError, match="float32 \\[M, 16\\]"):
        ext.vq8_mm(torch.randn(1, 12), wide, torch.randn(1, 2, 64), torch.ones(16), 1, 0)
    with pytest.raises(RuntimeError, match="4k coordinates and at most 256 codewords, not d=2"):
        ext.vq_quad_mm(torch.randn(1, 16), wide, torch.randn(1, 64, 2), torch.ones(16), 1)
    with pytest.raises(RuntimeError, match="float32 \\[G, K, d\\]"):
        ext.vq_quad_mm(torch.randn(1, 16), wide, torch.randn(1, 64, 4).double(), torch.ones(16), 1)
    with pytest.raises(RuntimeError, match="row_groups=2 does not fit"):
        ext.vq_dequant(wide, torch.randn(1, 64, 2), torch.ones(16), 2)
    with pytest.raises(RuntimeError, match="the codes' layout 16 at most"):
        ext.vq_dequant(codes, torch.randn(2, 64, 2), torch.ones(16), 1)


def test_the_form_builds_the_kernel_where_it_applies(ext):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 64, generator=g) * 0.05
    X = torch.randn(256, 64, generator=g)
    H = 2 / 256 * X.t() @ X
    form = get_form("vq")
    cases = ((32, 2, 2, LowbitVQLinear), (24, 2, 2, VQLinear), (32, 2, 3, LowbitVQLinear), (32, 4, 2, LowbitVQLinear), (24, 2, 3, VQLinear))
    for R, dim, bits, want in cases:  # 24 rows: no kernel
        res = vq_round(W[:R], H, dim, bits, group_size=32, row_scale=True)
        rec = ModuleRecord(name="l", out_features=R, in_features=64, form="vq")
        rec.payload = {"codes": res.codes, "table": res.table, "scale": res.scale}
        spec, tensors = encode_layer(res.weight, rec)
        auto, exact = form.build(spec, tensors), form.build(spec, tensors, backend="dequant")
        assert type(auto) is want and type(exact) is VQLinear
        assert want is VQLinear or auto.kernel == ("lowbit-vq16" if dim * bits == 4 else "lowbit-vq8")
        x = torch.randn(3, 64)
        assert torch.equal(exact(x), torch.nn.functional.linear(x, res.weight))
        assert rel_max_err(auto(x), exact(x)) < 1e-5
