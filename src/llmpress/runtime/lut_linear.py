"""A codebook-quantized linear at run time (the ``codebook`` storage form,
:mod:`llmpress.storage.forms.codebook`): b-bit indices [out, in] held as uint8, one float16
table of 2^b values per row (or per group of input columns), optional weights kept off the
tables (flat positions and float16 values).

- :class:`LutLinear` (every layer; ``backend="dequant"``): each call rebuilds the weight by
  table lookup (``table[row, group(j), code]``, then the kept weights scattered in) and runs
  one GEMM: outputs equal the compressed model's exactly (the same float32 weight, the same
  ``F.linear``).
- :class:`LowbitLutLinear` (at most 16 entries, groups of a multiple of 32 columns, CPU with
  llmpress's kernels; the first choice of ``backend="auto"``): codes packed two per byte in
  int32 words (4 bits each, the stream of :mod:`llmpress.quant.pack`) and float32 tables
  padded to 16 entries (with AVX-512: all 16 entries in one register, one permute per 16
  weights, codes of each 16 columns stored even columns first); up to ``SMALL_M``
  activation rows go through ``lut4_mm`` (the weights looked up in registers, no dense
  weight), the kept weights added as a sparse correction x[:, j] (v - table[code]); more
  rows (prefill) dequantize once (``lut4_dequant``) and run one GEMM. Outputs equal the
  compressed model's up to float32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.nuq import lookup
from ..storage.grid import pack_unsigned
from .cpu_kernels import SMALL_M, kernels

LUT_KERNEL_ENTRIES = 16


def lut_weight(
    codes: torch.Tensor, table: torch.Tensor, exc_index: torch.Tensor | None, exc_value: torch.Tensor | None, dtype=torch.float32
) -> torch.Tensor:
    """The dense weight [out, in] of codes [out, in], tables [out, G, K] and kept weights."""
    w = lookup(table, codes).to(dtype)
    if exc_index is not None and exc_index.numel():
        w.view(-1)[exc_index] = exc_value.to(dtype)
    return w


class LutLinear(nn.Module):
    kernel = "lut-dequant"

    def __init__(self, codes: torch.Tensor, table: torch.Tensor, *, exc_index=None, exc_value=None, bias: torch.Tensor | None = None):
        super().__init__()
        if codes.dim() != 2 or table.dim() != 3 or table.shape[0] != codes.shape[0] or codes.shape[1] % table.shape[1]:
            raise ValueError(f"codes {tuple(codes.shape)} and tables {tuple(table.shape)} do not fit")
        self.out_features, self.in_features = codes.shape
        self.bits = max(1, (table.shape[2] - 1).bit_length())
        self.register_buffer("codes", codes.to(torch.uint8).contiguous(), persistent=False)
        self.register_buffer("table", table.contiguous(), persistent=False)
        self.register_buffer("exc_index", exc_index, persistent=False)
        self.register_buffer("exc_value", exc_value, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (rebuilt on each access: for inspection, not for the hot path)."""
        return self.dequantized_weight()

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return lut_weight(self.codes, self.table, self.exc_index, self.exc_value, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(torch.float32)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        G, K = self.table.shape[1:]
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, tables={G}x{K}, kernel={self.kernel}"


def lut_kernel_applies(in_features: int, groups: int, entries: int) -> bool:
    """Whether :class:`LowbitLutLinear` can serve the layer (the kernels themselves aside)."""
    gs = in_features // groups
    return entries <= LUT_KERNEL_ENTRIES and gs % 32 == 0 and in_features % gs == 0


class LowbitLutLinear(nn.Module):
    kernel = "lowbit-lut4"

    def __init__(
        self,
        codes: torch.Tensor,
        table: torch.Tensor,
        *,
        exc_index=None,
        exc_value=None,
        bias: torch.Tensor | None = None,
        avx512: bool | None = None,
    ):
        super().__init__()
        R, C = codes.shape
        G, K = table.shape[1], table.shape[2]
        self.layout = int(kernels().lut_avx512() if avx512 is None else avx512)
        if not lut_kernel_applies(C, G, K):
            raise ValueError(f"the lookup-table kernel takes at most {LUT_KERNEL_ENTRIES} entries and groups of a multiple of 32 columns")
        self.out_features, self.in_features, self.group_size = R, C, C // G
        self.bits = max(1, (K - 1).bit_length())
        t = table.float()
        t16 = torch.cat([t, t[..., -1:].expand(R, G, LUT_KERNEL_ENTRIES - K)], dim=2) if K < LUT_KERNEL_ENTRIES else t
        self.entries = K
        u = codes.to(torch.int64)
        if self.layout == 1:  # per 16 columns: the even ones in one word, the odd ones in the next
            u = u.reshape(R, C // 16, 8, 2).transpose(2, 3).reshape(R, C)
        self.register_buffer("packed", pack_unsigned(u, 4), persistent=False)  # 8 codes per int32 word
        self.register_buffer("table", t16.contiguous(), persistent=False)
        rows = cols = delta = None
        if exc_index is not None and exc_index.numel():
            rows, cols = exc_index // C, exc_index % C
            delta = exc_value.float() - lookup(table, codes).reshape(-1)[exc_index]
        self.register_buffer("exc_index", exc_index, persistent=False)
        self.register_buffer("exc_value", exc_value, persistent=False)
        self.register_buffer("exc_rows", rows, persistent=False)
        self.register_buffer("exc_cols", cols, persistent=False)
        self.register_buffer("exc_delta", delta, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        w = kernels().lut4_dequant(self.packed, self.table, self.group_size, self.layout)
        if self.exc_index is not None:
            w.view(-1)[self.exc_index] = self.exc_value.float()
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if x2.shape[0] <= SMALL_M:
            y = kernels().lut4_mm(x2, self.packed, self.table, self.group_size, self.entries, self.layout)
            if self.exc_delta is not None:
                y.index_add_(1, self.exc_rows, x2[:, self.exc_cols] * self.exc_delta)
        else:
            y = F.linear(x2, self.dequantized_weight())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, kernel={self.kernel}"
        )
