"""A vector-quantized linear at run time (the ``vq`` storage form,
:mod:`llmpress.storage.forms.vq`): one index per vector of d consecutive input columns of a
row (held as int32 [out, in / d]) into float16 tables [G, K, d], one table per group of input
columns, optionally times a float16 scale per row.

- :class:`VQLinear` (every layer; ``backend="dequant"``): each call rebuilds the weight by table
  lookup and runs one GEMM: the outputs equal the compressed model's exactly (the same float32
  weight, the same ``F.linear``).
- :class:`LowbitVQLinear` (16 codewords, rows in blocks of 16, a CPU with llmpress's kernels:
  the first choice of ``backend="auto"``): lookup tables of the activations (``vq16_mm``),
  equal up to float32 summation order.
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


VQ_KERNEL_CODEWORDS = 16  # the kernel's tables hold one register of float32 entries
VQ_KERNEL_ROWS = 16  # output rows per block of the "vq16-r16" code layout


def vq_kernel_applies(out_features: int, codewords: int, row_groups: int = 1) -> bool:
    """Whether :class:`LowbitVQLinear` can serve a layer (the kernels themselves aside): 16
    codewords, each row group a whole number of blocks of 16 rows."""
    return codewords == VQ_KERNEL_CODEWORDS and out_features % (VQ_KERNEL_ROWS * row_groups) == 0


def pack_vq16(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, V] (N % 16 == 0) -> uint8 [N / 16, V, 8] ("vq16-r16"): per block of 16
    rows and per vector, byte j holds row j in its low nibble and row j + 8 in its high one."""
    N, V = codes.shape
    if N % VQ_KERNEL_ROWS:
        raise ValueError(f"the vq16 layout needs a multiple of {VQ_KERNEL_ROWS} rows, got {N}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("vq16 codes must lie in 0..15")
    b = codes.to(torch.uint8).reshape(N // 16, 2, 8, V)
    return (b[:, 0] | (b[:, 1] << 4)).permute(0, 2, 1).contiguous()


def unpack_vq16(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_vq16`: uint8 [N / 16, V, 8] -> int64 codes [N, V]."""
    NB, V, _ = packed.shape
    b = packed.permute(0, 2, 1)  # [NB, 8, V]
    return torch.stack([b & 0xF, b >> 4], dim=1).reshape(NB * 16, V).long()


class LowbitVQLinear(_Lowbit):
    """A ``vq`` layer of 16 codewords served by llmpress's CPU kernel (``vq16_mm``,
    ``csrc/vq_cpu.cpp``): up to ``SMALL_M`` activation rows are multiplied through lookup
    tables of the activations, P[m, v, k] = x[m, vector v] . T[g(v), k], then
    y[m, n] = s[n] sum_v P[m, v, code[n, v]] (16 rows per register lookup; codes 4 bits per
    vector in memory, no dense weight formed); more rows (prefill) rebuild the weight once and
    run one GEMM. Outputs equal the compressed model's up to float32 summation order."""

    kernel = "lowbit-vq16"

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
                f"the vq16 kernel takes {VQ_KERNEL_CODEWORDS} codewords, row groups in blocks of {VQ_KERNEL_ROWS} rows and whole vectors per group"
            )
        super().__init__(R, V * d, bias)
        self.dim, self.groups, self.row_groups, self.avx512 = d, G, row_groups, int(avx512)
        self.register_buffer("packed", pack_vq16(codes), persistent=False)
        self.register_buffer("table", table.float().contiguous(), persistent=False)  # [G, 16, d]
        self.register_buffer("table_t", self.table.transpose(1, 2).contiguous(), persistent=False)  # [G, d, 16]: the kernel's
        ones = torch.ones(R, device=codes.device)
        self.register_buffer("scale", (ones if scale is None else scale.float()).contiguous(), persistent=False)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return vq_lookup(self.table, unpack_vq16(self.packed), self.scale, self.row_groups).to(dtype)

    def _small(self, ext, x2: torch.Tensor) -> torch.Tensor:
        return ext.vq16_mm(x2, self.packed, self.table_t, self.scale, self.row_groups, self.avx512)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dim={self.dim}, tables={self.groups}x16, kernel={self.kernel}"
