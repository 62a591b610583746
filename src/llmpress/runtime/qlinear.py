"""Linear layers that keep their weights compressed at inference (the integer-grid storage
form, :mod:`llmpress.storage.forms.int_grid`, chooses among them).

- :class:`DequantLinear` (every scheme): int8 codes + float32 scales in memory; each call
  rebuilds the weight with :func:`llmpress.storage.grid.dequant` (the arithmetic of the
  fake-quantized model, op for op) and multiplies: outputs equal the fake-quantized
  model's exactly.
- :class:`LowbitInt4Linear` / :class:`LowbitInt8Linear` (4-bit integer weights in groups
  of a multiple of 32, or 8-bit symmetric per-channel weights; CPU with AVX2): llmpress's
  own kernels (:mod:`llmpress.runtime.cpu_kernels`), float32 activations, each weight
  streamed once per call for up to 4 rows; more than ``SMALL_M`` rows (prefill)
  dequantize once and run one float32 GEMM. Outputs equal the fake-quantized model's up to
  float32 summation order. The first choice of ``backend="auto"`` where they build.
- :class:`Int4Linear` (4-bit integer weights, CPU): torch's int4 weight-only kernel
  ``aten._weight_int4pack_mm_for_cpu``. Weights [N, K] as codes 0..15 are repacked by
  ``aten._convert_weight_to_int4pack_for_cpu`` into uint8 [N, K/2]; per group of
  ``qGroupSize`` (32, 64, 128 or 256) input columns the kernel computes
  ``w = (q - 8) * scale + zero`` from ``scale_and_zeros`` [K/g, N, 2] in the activation's
  dtype. Symmetric codes c in [-8, 7] map exactly (q = c + 8, zero = 0); asymmetric
  (q, z) use zero = (8 - z) * scale (one extra rounding). Per-channel / per-tensor
  scales are repeated over groups of the largest supported size dividing K (exact).
  Needs N % 16 == 0.
- :class:`Int8WeightOnlyLinear` (8-bit symmetric per-channel or per-tensor weights,
  CPU): ``aten._weight_int8pack_mm`` (int8 [N, K] weights, scales [N]).
- W8A8 (8-bit symmetric per-channel weights, dynamic 8-bit per-token activations):
  :class:`llmpress.runtime.int8.Int8Linear` (integer GEMM), when that module exists.

The kernels take float32, bfloat16 or float16 activations. ``act_dtype`` (default:
:data:`KERNEL_ACT_DTYPE`) is the dtype the int4 / int8 weight-only kernels run in; a
float32 model casts activations to it around the kernel and back (W4A16: the 16-bit
activations the name says; torch's float32 path of these kernels is a slow reference
loop on x86, see benchmarks/serve_bench.py). Outputs then match the fake-quantized
model to bfloat16 rounding of the activations, not bit for bit.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.args import QuantArgs
from ..storage.form import LinearSpec, get_form
from ..storage.grid import Decoded, dequant_decoded

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "dequant")
INT4_GROUPS = (256, 128, 64, 32)
KERNEL_ACT_DTYPE = torch.bfloat16


class _Base(nn.Module):
    """Shared parts: shape, optional bias, a dequantized ``weight`` for code that reads it."""

    kernel = "dequant"

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (rebuilt on each access: for inspection, not for the hot path)."""
        return self.dequantized_weight()

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def _out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class DequantLinear(_Base):
    """Any stored scheme: rebuild the weight each call, then ``F.linear`` (exact)."""

    def __init__(self, decoded: Decoded | torch.Tensor, bias: torch.Tensor | None = None):
        if isinstance(decoded, torch.Tensor):  # a dense (e.g. pruned) weight
            super().__init__(*decoded.shape, bias)
            self.args = None
            self.register_buffer("dense", decoded.detach(), persistent=False)
            return
        super().__init__(*decoded.codes.shape, bias)
        self.args: QuantArgs | None = decoded.args
        self.register_buffer("codes", decoded.codes.contiguous(), persistent=False)
        self.register_buffer("scale", decoded.qparams.scale.contiguous(), persistent=False)
        self.register_buffer("zero_point", decoded.qparams.zero_point, persistent=False)
        self.register_buffer("g_idx", decoded.g_idx, persistent=False)
        self.register_buffer("exc_index", decoded.exc_index, persistent=False)
        self.register_buffer("exc_value", decoded.exc_value, persistent=False)

    def _decoded(self) -> Decoded:
        from ..quant.core import QParams

        return Decoded(
            codes=self.codes,
            qparams=QParams(scale=self.scale, zero_point=self.zero_point),
            args=self.args,
            g_idx=self.g_idx,
            exc_index=self.exc_index,
            exc_value=self.exc_value,
        )

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        if self.args is None:
            return self.dense.to(dtype)
        return dequant_decoded(self._decoded(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense if self.args is None else dequant_decoded(self._decoded(), x.dtype)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def int4_group_size(spec: LinearSpec) -> int | None:
    """Group size the CPU int4 kernel would run this layer with, or None if it cannot."""
    a, K = spec.weight_args, spec.in_features
    if a.granularity == "group":
        return a.group_size if a.group_size in INT4_GROUPS else None
    return next((g for g in INT4_GROUPS if K % g == 0), None)


def _per_group(p: torch.Tensor, N: int, groups: int) -> torch.Tensor:
    """Scales / zero points [R, G] (R in {1, N}) -> float32 [N, groups] (channel / tensor: repeated)."""
    p = p.float().expand(N, p.shape[1])
    return p.repeat_interleave(groups // p.shape[1], dim=1).contiguous()


def lowbit_int4_group_size(spec: LinearSpec) -> int | None:
    """Group size llmpress's int4 kernel would run this layer with, or None if it cannot."""
    a, K = spec.weight_args, spec.in_features
    g = a.group_size if a.granularity == "group" else K
    return g if g and g % 32 == 0 and K % g == 0 else None


class _Lowbit(_Base):
    """llmpress's CPU kernels: up to ``SMALL_M`` rows through ``_small``, more (prefill)
    through one float32 GEMM on the dequantized weight."""

    small_m: int | None = None  # rows up to which ``_small`` runs (None: cpu_kernels.SMALL_M)

    def _small(self, ext, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .cpu_kernels import SMALL_M, kernels

        x2 = x.reshape(-1, self.in_features).float().contiguous()
        ext = kernels()
        if ext is not None and x2.shape[0] <= (SMALL_M if self.small_m is None else self.small_m):
            y = self._small(ext, x2)
        else:
            y = F.linear(x2, self.dequantized_weight())
        return self._out(y, x)


class LowbitInt4Linear(_Lowbit):
    """4-bit integer weights through llmpress's CPU kernel (float32 activations)."""

    kernel = "llmpress_int4_cpu"

    def __init__(self, decoded: Decoded, group_size: int, bias: torch.Tensor | None = None):
        from .cpu_kernels import pack_int4

        N, K = decoded.codes.shape
        super().__init__(N, K, bias)
        a = decoded.args
        self.group_size = group_size
        q = decoded.codes.to(torch.int32) + (8 if a.symmetric else 0)  # 0..15
        self.register_buffer("packed", pack_int4(q), persistent=False)
        self.register_buffer("scales", _per_group(decoded.qparams.scale, N, K // group_size), persistent=False)
        zp = decoded.qparams.zero_point
        z = torch.full_like(self.scales, 8.0) if zp is None else _per_group(zp, N, K // group_size)
        self.register_buffer("zeros", z, persistent=False)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        from .cpu_kernels import kernels, unpack_int4

        ext = kernels()
        if ext is not None:
            return ext.int4_dequant(self.packed, self.scales, self.zeros, self.group_size).to(dtype)
        g = self.group_size
        q = unpack_int4(self.packed).float().reshape(self.out_features, -1, g)
        return ((q - self.zeros.unsqueeze(-1)) * self.scales.unsqueeze(-1)).reshape(self.out_features, self.in_features).to(dtype)

    def _small(self, ext, x2: torch.Tensor) -> torch.Tensor:
        return ext.int4_mm(x2, self.packed, self.scales, self.zeros, self.group_size)


class LowbitInt8Linear(_Lowbit):
    """8-bit symmetric per-channel weights through llmpress's CPU kernel (float32 activations)."""

    kernel = "llmpress_int8_cpu"

    def __init__(self, decoded: Decoded, bias: torch.Tensor | None = None):
        N, K = decoded.codes.shape
        super().__init__(N, K, bias)
        self.register_buffer("codes", decoded.codes.to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("scales", decoded.qparams.scale.float().reshape(-1).expand(N).contiguous(), persistent=False)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return (self.codes.float() * self.scales.unsqueeze(1)).to(dtype)

    def _small(self, ext, x2: torch.Tensor) -> torch.Tensor:
        return ext.int8_mm(x2, self.codes, self.scales)


class Int4Linear(_Base):
    """4-bit integer weights through ``aten._weight_int4pack_mm_for_cpu``."""

    kernel = "int4pack_mm_cpu"

    def __init__(self, decoded: Decoded, group_size: int, bias: torch.Tensor | None = None, act_dtype: torch.dtype = KERNEL_ACT_DTYPE):
        N, K = decoded.codes.shape
        super().__init__(N, K, bias)
        a = decoded.args
        self.group_size = group_size
        self.act_dtype = act_dtype
        q = decoded.codes.to(torch.int32) + (8 if a.symmetric else 0)  # 0..15
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1), persistent=False)
        s = _per_group(decoded.qparams.scale, N, K // group_size)
        zero = torch.zeros_like(s)
        if decoded.qparams.zero_point is not None:
            zero = (8 - _per_group(decoded.qparams.zero_point, N, K // group_size)) * s
        sz = torch.stack([s.t(), zero.t()], dim=-1).contiguous()  # [K/g, N, 2]
        self.register_buffer("scale_and_zeros", sz.to(act_dtype), persistent=False)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self.act_dtype)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_and_zeros)
        return w.t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_and_zeros)
        return self._out(y, x)


class Int8WeightOnlyLinear(_Base):
    """8-bit symmetric per-channel weights through ``aten._weight_int8pack_mm``."""

    kernel = "int8pack_mm"

    def __init__(self, decoded: Decoded, bias: torch.Tensor | None = None, act_dtype: torch.dtype = KERNEL_ACT_DTYPE):
        N, K = decoded.codes.shape
        super().__init__(N, K, bias)
        self.act_dtype = act_dtype
        self.register_buffer("codes", decoded.codes.to(torch.int8).contiguous(), persistent=False)
        s = decoded.qparams.scale.float().reshape(-1).expand(N).contiguous()
        self.register_buffer("scales", s.to(act_dtype), persistent=False)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return (self.codes.float() * self.scales.float().unsqueeze(1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype).contiguous()
        return self._out(torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scales), x)


def build_linear(
    spec: LinearSpec,
    tensors: dict[str, torch.Tensor],
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    act_dtype: torch.dtype = KERNEL_ACT_DTYPE,
) -> nn.Module:
    """The runtime module for one stored linear: its storage form's ``build``.

    For integer grids (:mod:`llmpress.storage.forms.int_grid`): ``backend="dequant"`` always
    gives :class:`DequantLinear` (exact); ``"auto"`` the fastest kernel that applies to the
    scheme on ``device`` (CPU kernels only on CPU: llmpress's own where they build, else
    torch's), else the same fallback; ``"torch"`` only torch's kernels (for comparison).
    Activation quantization (``spec.act_args``) wraps the module in :class:`ActQuantLinear`,
    except for W8A8 where the integer GEMM quantizes them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} unknown; expected one of {', '.join(BACKENDS)}")
    return get_form(spec.kind).build(spec, tensors, bias=bias, backend=backend, device=device, act_dtype=act_dtype)
