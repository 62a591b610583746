"""A codebook-quantized linear at run time (the ``codebook`` storage form,
:mod:`llmpress.storage.forms.codebook`): b-bit indices [out, in] held as uint8, one float16
table of 2^b values per row (or per group of input columns), optional weights kept off the
tables (flat positions and float16 values).

For now each call rebuilds the weight by table lookup (``table[row, group(j), code]``, then
the kept weights scattered in) and runs one GEMM: outputs equal the compressed model's
exactly (the same float32 weight, the same ``F.linear``). A lookup-table kernel for decode
(no dense weight) is the next step (docs/codebooks.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.nuq import lookup


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
