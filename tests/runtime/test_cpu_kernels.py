"""llmpress's own CPU kernels (runtime/csrc/lowbit_cpu.cpp): exact layouts, products equal to
dequantize-then-multiply, module choice. Built once per machine (about a minute); skipped only
where the CPU or the environment rules them out, never because a build failed."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import rel_max_err, stored_linear

from llmpress.export import codec
from llmpress.quant import QuantArgs
from llmpress.runtime import cpu_kernels
from llmpress.runtime.qlinear import DequantLinear, LowbitInt4Linear, LowbitInt8Linear, build_linear

pytestmark = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None, reason=str(cpu_kernels.unavailable_reason()))


_stored = functools.partial(stored_linear, out=96, inp=576, bias=True)


def test_pack_roundtrip_and_layout():
    q = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0))
    p = cpu_kernels.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 32)
    assert torch.equal(cpu_kernels.unpack_int4(p), q.to(torch.int32))
    assert int(p[0, 0]) == int(q[0, 0]) | (int(q[0, 8]) << 4)  # byte j: column j low, j + 8 high
    with pytest.raises(ValueError, match="0..15"):
        cpu_kernels.pack_int4(q + 1)
    with pytest.raises(ValueError, match="K % 16"):
        cpu_kernels.pack_int4(q[:, :40])


@pytest.mark.parametrize("N,K,gs", [(64, 256, 32), (192, 576, 64), (40, 576, 576), (33, 1536, 128)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8])
def test_int4_mm_equals_dequantized_product(ext, N, K, gs, M):
    g = torch.Generator().manual_seed(N + M)
    q = torch.randint(0, 16, (N, K), generator=g)
    s = torch.rand(N, K // gs, generator=g) + 0.05
    z = torch.randint(0, 16, (N, K // gs), generator=g).float()
    w = ((q.float().reshape(N, -1, gs) - z[..., None]) * s[..., None]).reshape(N, K)
    p = cpu_kernels.pack_int4(q)
    assert torch.equal(ext.int4_dequant(p, s, z, gs), w)
    x = torch.randn(M, K, generator=g)
    x[0, 7] = 2.5e4  # a massive activation: subtracting the zero before the product keeps it exact
    y = ext.int4_mm(x, p, s, z, gs)
    assert y.shape == (M, N)
    assert rel_max_err(y, x.double() @ w.double().T) < 2e-6
    paths = [0, 1] if ext.cpu_avx512() else [0]  # AVX2, and AVX-512 where the CPU has it (the default there)
    for avx512 in paths:
        assert rel_max_err(ext.int4_mm(x, p, s, z, gs, avx512=avx512), x.double() @ w.double().T) < 2e-6
    if not ext.cpu_avx512():
        with pytest.raises(RuntimeError, match="no AVX-512"):
            ext.int4_mm(x, p, s, z, gs, avx512=1)


def test_int8_mm_equals_dequantized_product(ext):
    g = torch.Generator().manual_seed(3)
    c = torch.randint(-127, 128, (96, 576), generator=g, dtype=torch.int8)
    s = torch.rand(96, generator=g)
    for M in (1, 3, 6):
        x = torch.randn(M, 576, generator=g)
        ref = x.double() @ (c.double() * s.double()[:, None]).T
        assert rel_max_err(ext.int8_mm(x, c, s), ref) < 2e-6
        for avx512 in [0, 1] if ext.cpu_avx512() else [0]:
            assert rel_max_err(ext.int8_mm(x, c, s, avx512=avx512), ref) < 2e-6
            x16, c16 = x[:, :560].contiguous(), c[:, :560].contiguous()  # K % 32 == 16: the AVX-512 path's last half step
            assert rel_max_err(ext.int8_mm(x16, c16, s, avx512=avx512), x16.double() @ (c16.double() * s.double()[:, None]).T) < 2e-6


def test_bad_arguments_are_named(ext):
    p = torch.zeros(8, 32, dtype=torch.uint8)
    s = torch.ones(8, 1)
    with pytest.raises(RuntimeError, match="group size"):
        ext.int4_mm(torch.zeros(1, 64), p, s, s, 48)
    with pytest.raises(RuntimeError, match="x must be"):
        ext.int4_mm(torch.zeros(1, 32), p, s, s, 64)
    with pytest.raises(RuntimeError, match="scales"):
        ext.int4_mm(torch.zeros(1, 64), p, torch.ones(8, 2), s, 64)


@pytest.mark.parametrize(
    "args",
    [
        QuantArgs(bits=4, group_size=64),
        QuantArgs(bits=4, group_size=32, symmetric=False),
        QuantArgs(bits=4, granularity="channel"),
        QuantArgs(bits=4, granularity="tensor", symmetric=False),
    ],
    ids=lambda a: a.describe().replace(" ", "-"),
)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_int4_module_equals_fake_quant(ext, args, rows):
    spec, t, wq, b = _stored(args)
    mod = build_linear(spec, t, b)
    assert isinstance(mod, LowbitInt4Linear) and mod.kernel == "llmpress_int4_cpu"
    x = torch.randn(2, rows, 576, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        y = mod(x)
        ref = torch.nn.functional.linear(x, wq, b)
    assert y.shape == ref.shape and rel_max_err(y, ref) < 2e-6
    assert rel_max_err(mod.dequantized_weight(), wq) < 1e-6
    assert torch.equal(DequantLinear(codec.decode_quant(spec, t), b).dequantized_weight(), wq)


def test_int8_module_and_choice(ext):
    spec, t, wq, b = _stored(QuantArgs(bits=8, granularity="channel"))
    mod = build_linear(spec, t, b)
    assert isinstance(mod, LowbitInt8Linear)
    for rows in (1, 5, 20):
        x = torch.randn(rows, 576)
        with torch.no_grad():
            assert rel_max_err(mod(x), torch.nn.functional.linear(x, wq, b)) < 2e-6
    assert type(build_linear(spec, t, b, backend="torch")).__name__ == "Int8WeightOnlyLinear"


def test_disabled_by_environment(monkeypatch):
    for off in ("0", "false", "No", " OFF "):
        monkeypatch.setenv("LLMPRESS_CPU_KERNELS", off)
        assert cpu_kernels.unavailable_reason() == "disabled by LLMPRESS_CPU_KERNELS", off
    for on in ("1", "yes"):  # this module runs only where the CPU allows them
        monkeypatch.setenv("LLMPRESS_CPU_KERNELS", on)
        assert cpu_kernels.unavailable_reason() is None, on
