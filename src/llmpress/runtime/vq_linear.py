"""A vector-quantized linear at run time (the ``vq`` storage form,
:mod:`llmpress.storage.forms.vq`): one index per vector of d consecutive input columns of a
row (held as int32 [out, in / d]) into float16 tables [G, K, d], one table per group of input
columns, optionally times a float16 scale per row.

- :class:`VQLinear` (every layer; ``backend="dequant"``): each call rebuilds the weight by table
  lookup and runs one GEMM: the outputs equal the compressed model's exactly (the same float32
  weight, the same ``F.linear``).
- :class:`LowbitVQLinear` (16, 32, 64, 128 or 256 codewords, rows in blocks of 16, a CPU with
  llmpress's kernels: the first choice of ``backend="auto"``): lookup tables of the
  activations (``vq16_mm`` / ``vq8_mm``), equal up to float32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.vq import vq_lookup
from .qlinear import _Lowbit


class VQLinear(nn.Module):
    kernel = "vq-dequant"

    def __init__(
        self, codes: torch.Tensor, table: torch.Tensor, *, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None, row_groups: int = 1
    ):
        super().__init__()
        G = table.shape[0] if table.dim() == 3 else 0
        if codes.dim() != 2 or not G or G % row_groups or codes.shape[0] % row_groups or (codes.shape[1] * table.shape[2]) % (G // row_groups):
            raise ValueError(f"codes {tuple(codes.shape)} and tables {tuple(table.shape)} ({row_groups} row groups) do not fit")
        self.out_features = codes.shape[0]
        self.in_features = codes.shape[1] * table.shape[2]
        self.row_groups = row_groups
        self.register_buffer("codes", codes.to(torch.int32).contiguous(), persistent=False)
        self.register_buffer("table", table.contiguous(), persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (rebuilt on each access: for inspection, not for the hot path)."""
        return self.dequantized_weight()

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return vq_lookup(self.table, self.codes, self.scale, self.row_groups).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(torch.float32)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        G, K, d = self.table.shape
        return f"in_features={self.in_features}, out_features={self.out_features}, dim={d}, tables={G}x{K}, kernel={self.kernel}"


VQ_KERNEL_CODEWORDS = 16  # vq16_mm: the tables hold one register of float32 entries
VQ_WIDE_CODEWORDS = (32, 64, 128, 256)  # vq8_mm: one byte per code, a gather per 16 rows
VQ_KERNEL_ROWS = 16  # output rows per block of both code layouts


def vq_kernel_applies(out_features: int, codewords: int, row_groups: int = 1) -> bool:
    """Whether :class:`LowbitVQLinear` can serve a layer (the kernels themselves aside): 16
    codewords (``vq16_mm``) or 32, 64, 128 or 256 (``vq8_mm``),
    each row group a whole number of blocks of 16 rows."""
    return (codewords == VQ_KERNEL_CODEWORDS or codewords in VQ_WIDE_CODEWORDS) and out_features % (VQ_KERNEL_ROWS * row_groups) == 0


def _check_codes(codes: torch.Tensor, K: int, layout: str) -> int:
    N = codes.shape[0]
    if N % VQ_KERNEL_ROWS:
        raise ValueError(f"the {layout} layout needs a multiple of {VQ_KERNEL_ROWS} rows, got {N}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
        raise ValueError(f"{layout} codes must lie in 0..{K - 1}")
    return N


def pack_vq16(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, V] (N % 16 == 0) -> uint8 [N / 16, V, 8] ("vq16-r16"): per block of 16
    rows and per vector, byte j holds row j in its low nibble and row j + 8 in its high one."""
    N = _check_codes(codes, 16, "vq16")
    b = codes.to(torch.uint8).reshape(N // 16, 2, 8, codes.shape[1])
    return (b[:, 0] | (b[:, 1] << 4)).permute(0, 2, 1).contiguous()


def unpack_vq16(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_vq16`: uint8 [N / 16, V, 8] -> int64 codes [N, V]."""
    NB, V, _ = packed.shape
    b = packed.permute(0, 2, 1)  # [NB, 8, V]
    return torch.stack([b & 0xF, b >> 4], dim=1).reshape(NB * 16, V).long()


def pack_vq8(codes: torch.Tensor, codewords: int = 256) -> torch.Tensor:
    """Codes 0..codewords-1 [N, V] (N % 16 == 0, codewords <= 256) -> uint8 [N / 16, V, 16] ("vq8-r16"): per
    block of 16 rows and per vector, byte j is row j's code."""
    N = _check_codes(codes, codewords, "vq8")
    return codes.to(torch.uint8).reshape(N // 16, 16, codes.shape[1]).permute(0, 2, 1).contiguous()


def unpack_vq8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_vq8`: uint8 [N / 16, V, 16] -> int64 codes [N, V]."""
    NB, V, _ = packed.shape
    return packed.permute(0, 2, 1).reshape(NB * 16, V).long()


class LowbitVQLinear(_Lowbit):
    """A ``vq`` layer served by llmpress's CPU kernels (``csrc/vq_cpu.cpp``), no dense weight
    formed for up to ``small_m`` activation rows (32; 8 for the 32..256-codeword layouts the
    quad loads do not take). A few rows are multiplied through
    lookup tables of the activations, P[m, v, k] = x[m, vector v] . T[g(v), k], then
    y[m, n] = s[n] sum_v P[m, v, code[n, v]]: 16 codewords ``vq16_mm`` (codes 4 bits per
    vector, 16 rows per register lookup), 32..256 codewords ``vq8_mm`` (one byte per code,
    16 rows per gather or register tree). More rows share one lookup of the weights among
    them (the kernels' direct path; vectors of 4k coordinates: ``vq_quad_mm`` from 2 rows,
    128-bit loads of the codewords instead of gathers). Beyond ``small_m`` rows (prefill) the
    weight is rebuilt once and one GEMM runs. Outputs equal the compressed model's up to
    float32 summation order."""

    kernel = "lowbit-vq16"
    small_m = 32  # the kernels up to 32 activation rows (16 codewords, 4-d quad loads): 1.3-3x dequantize + GEMM from 8 to 32

    def __init__(
        self,
        codes: torch.Tensor,
        table: torch.Tensor,
        *,
        scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        row_groups: int = 1,
        avx512: int = -1,
    ):
        G, K, d = table.shape
        R, V = codes.shape
        if not vq_kernel_applies(R, K, row_groups) or G % row_groups or V % (G // row_groups):
            raise ValueError(
                f"the vq kernels take {VQ_KERNEL_CODEWORDS} or {'/'.join(map(str, VQ_WIDE_CODEWORDS))} codewords, "
                f"row groups in blocks of {VQ_KERNEL_ROWS} rows and whole vectors per group"
            )
        super().__init__(R, V * d, bias)
        self.dim, self.groups, self.codewords, self.row_groups, self.avx512 = d, G, K, row_groups, int(avx512)
        self.wide = K != VQ_KERNEL_CODEWORDS
        self.quad = False  # vq_quad_mm from 2 activation rows (vectors of 4k coordinates, AVX-512)
        if self.wide:
            self.kernel = "lowbit-vq8"
            from .cpu_kernels import kernels

            ext = kernels()
            self.quad = d % 4 == 0 and self.avx512 != 0 and ext is not None and bool(ext.vq16_avx512())
            if not self.quad:  # a register tree or a gather per lookup: dequantize + GEMM wins from ~16 rows
                self.small_m = 8
        self.register_buffer("packed", pack_vq8(codes, K) if self.wide else pack_vq16(codes), persistent=False)
        self.register_buffer("table", table.float().contiguous(), persistent=False)  # [G, K, d]
        self.register_buffer("table_t", self.table.transpose(1, 2).contiguous(), persistent=False)  # [G, d, K]: the kernel's
        ones = torch.ones(R, device=codes.device)
        self.register_buffer("scale", (ones if scale is None else scale.float()).contiguous(), persistent=False)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        from .cpu_kernels import kernels

        ext = kernels()
        if ext is not None:  # prefill: ~20x torch's indexing
            return ext.vq_dequant(self.packed, self.table, self.scale, self.row_groups).to(dtype)
        codes = unpack_vq8(self.packed) if self.wide else unpack_vq16(self.packed)
        return vq_lookup(self.table, codes, self.scale, self.row_groups).to(dtype)

    def _small(self, ext, x2: torch.Tensor) -> torch.Tensor:
        if self.quad and x2.shape[0] >= 2:
            return ext.vq_quad_mm(x2, self.packed, self.table, self.scale, self.row_groups)
        mm = ext.vq8_mm if self.wide else ext.vq16_mm
        return mm(x2, self.packed, self.table_t, self.scale, self.row_groups, self.avx512)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, dim={self.dim}, "
            f"tables={self.groups}x{self.codewords}, kernel={self.kernel}"
        )
