"""Runtime linears: each CPU kernel against the exact dequantize fallback, and which one is chosen."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import rel_err, stored_linear

from llmpress.export import codec
from llmpress.quant import QuantArgs
from llmpress.runtime.act_quant import ActQuantLinear
from llmpress.runtime.qlinear import DequantLinear, Int4Linear, Int8WeightOnlyLinear, LowbitInt4Linear, build_linear, int4_group_size

_stored = functools.partial(stored_linear, out=64, inp=256)


def _x(rows, inp, seed=1):
    return torch.randn(rows, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "args",
    [
        QuantArgs(bits=4, group_size=32),
        QuantArgs(bits=4, group_size=64),
        QuantArgs(bits=4, group_size=128),
        QuantArgs(bits=4, group_size=64, symmetric=False),
        QuantArgs(bits=4, granularity="channel"),
        QuantArgs(bits=4, granularity="channel", symmetric=False),
        QuantArgs(bits=4, granularity="tensor"),
    ],
    ids=lambda a: a.describe().replace(" ", "-"),
)
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_int4_kernel_matches_fallback(args, rows):
    spec, t, wq, b = _stored(args, bias=True)
    mod = build_linear(spec, t, b, backend="torch")
    assert isinstance(mod, Int4Linear)
    ref = DequantLinear(codec.decode_quant(spec, t), b)
    x = _x(rows, 256)
    with torch.no_grad():
        y, y_ref = mod(x), ref(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 64)
    assert torch.equal(y_ref, torch.nn.functional.linear(x, wq, b))  # the fallback is the fake-quant linear
    assert rel_err(y, y_ref) < 1e-2  # bf16 activations inside the kernel
    # in float32 the kernel computes the same weight: agreement to float rounding
    mod32 = Int4Linear(codec.decode_quant(spec, t), int4_group_size(spec), b, act_dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(mod32(x), y_ref) < 1e-5
    w_kernel = mod32.dequantized_weight()
    tol = 0 if args.symmetric else 1e-6  # asymmetric: zero = (8 - z) * scale is one more rounding
    assert (w_kernel - wq).abs().max() <= tol * wq.abs().max()


def test_int4_symmetric_codes_are_exact_in_kernel():
    """Symmetric codes map onto the kernel's (q - 8) * scale with no rounding at all."""
    spec, t, wq, _ = _stored(QuantArgs(bits=4, group_size=64))
    mod = Int4Linear(codec.decode_quant(spec, t), 64, act_dtype=torch.float32)
    assert torch.equal(mod.dequantized_weight(), wq)


def test_int8_weight_only_kernel():
    spec, t, wq, b = _stored(QuantArgs(bits=8, granularity="channel"), bias=True)
    mod = build_linear(spec, t, b, backend="torch")
    assert isinstance(mod, Int8WeightOnlyLinear)
    x = _x(7, 256)
    with torch.no_grad():
        assert rel_err(mod(x), torch.nn.functional.linear(x, wq, b)) < 1e-2
        mod32 = Int8WeightOnlyLinear(codec.decode_quant(spec, t), b, act_dtype=torch.float32)
        assert rel_err(mod32(x), torch.nn.functional.linear(x, wq, b)) < 1e-5
    assert torch.equal(mod32.dequantized_weight(), wq)


def test_w8a8_uses_integer_gemm():
    from llmpress.runtime import int8

    act = QuantArgs(bits=8, granularity="token")
    spec, t, wq, b = _stored(QuantArgs(bits=8, granularity="channel"), act=act, bias=True)
    mod = build_linear(spec, t, b)
    assert isinstance(mod, int8.Int8Linear)
    ref = ActQuantLinear(DequantLinear(codec.decode_quant(spec, t), b), act)
    x = _x(9, 256)
    with torch.no_grad():
        assert rel_err(mod(x), ref(x)) < 1e-5  # same integers, float rounding of the rescale only


@pytest.mark.parametrize(
    "args,out,why",
    [
        (QuantArgs(bits=3, group_size=64), 64, "3 bits"),
        (QuantArgs(bits=4, group_size=16), 64, "group 16 unsupported by the kernel"),
        (QuantArgs(bits=8, group_size=64), 64, "8-bit groups"),
        (QuantArgs(bits=8, granularity="channel", symmetric=False), 64, "8-bit asymmetric"),
        (QuantArgs(kind="ternary", granularity="channel"), 64, "ternary"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fallback_where_no_kernel_applies(args, out, why, backend):
    spec, t, wq, _ = _stored(args, out=out)
    mod = build_linear(spec, t, backend=backend)
    assert type(mod) is DequantLinear, why
    x = _x(3, 256)
    with torch.no_grad():
        assert torch.equal(mod(x), torch.nn.functional.linear(x, wq))


def test_output_rows_not_a_multiple_of_16():
    """40 output rows: torch's int4 kernel needs N % 16 == 0 and falls back to the exact
    dequantized product; llmpress's own kernel has no such constraint and serves it."""
    from llmpress.runtime.cpu_kernels import kernels

    spec, t, wq, _ = _stored(QuantArgs(bits=4, group_size=64), out=40)
    x = _x(3, 256)
    ref = torch.nn.functional.linear(x, wq)
    torch_mod = build_linear(spec, t, backend="torch")
    auto = build_linear(spec, t, backend="auto")
    assert type(torch_mod) is DequantLinear
    assert type(auto) is (LowbitInt4Linear if kernels() is not None else DequantLinear)
    with torch.no_grad():
        assert torch.equal(torch_mod(x), ref)
        assert rel_err(auto(x), ref) < 1e-5  # float32 activations, the same weights, another summation order


def test_forced_dequant_and_activation_wrapper():
    act = QuantArgs(bits=8, granularity="token")
    spec, t, wq, _ = _stored(QuantArgs(bits=4, group_size=64), act=act)
    assert isinstance(build_linear(spec, t, backend="dequant"), ActQuantLinear)
    mod = build_linear(spec, t)
    assert isinstance(mod, ActQuantLinear) and isinstance(mod.linear, (Int4Linear, LowbitInt4Linear))  # W4A8: int4 kernel + A8 fake-quant
    assert build_linear(spec, t, device="meta").linear.__class__ is DequantLinear  # CPU kernels only on CPU
    with pytest.raises(ValueError, match="backend"):
        build_linear(spec, t, backend="fast")


def test_bfloat16_model_activations():
    spec, t, wq, _ = _stored(QuantArgs(bits=4, group_size=64))
    mod = build_linear(spec, t)
    x = _x(4, 256).to(torch.bfloat16)
    with torch.no_grad():
        y = mod(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), torch.nn.functional.linear(x.float(), wq)) < 1e-2
