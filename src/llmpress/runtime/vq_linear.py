"""A vector-quantized linear at run time (the ``vq`` storage form,
:mod:`llmpress.storage.forms.vq`): one index per vector of d consecutive input columns of a
row (held as int32 [out, in / d]) into float16 tables [G, K, d], one table per group of input
columns, optionally times a float16 scale per row. Each call rebuilds the weight by table lookup and runs one GEMM (no kernel): the
outputs equal the compressed model's exactly (the same float32 weight, the same ``F.linear``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.vq import vq_lookup


class VQLinear(nn.Module):
    kernel = "vq-dequant"

    def __init__(self, codes: torch.Tensor, table: torch.Tensor, *, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        if codes.dim() != 2 or table.dim() != 3 or (codes.shape[1] * table.shape[2]) % table.shape[0]:
            raise ValueError(f"codes {tuple(codes.shape)} and tables {tuple(table.shape)} do not fit")
        self.out_features = codes.shape[0]
        self.in_features = codes.shape[1] * table.shape[2]
        self.register_buffer("codes", codes.to(torch.int32).contiguous(), persistent=False)
        self.register_buffer("table", table.contiguous(), persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (rebuilt on each access: for inspection, not for the hot path)."""
        return self.dequantized_weight()

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return vq_lookup(self.table, self.codes, self.scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(torch.float32)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        G, K, d = self.table.shape
        return f"in_features={self.in_features}, out_features={self.out_features}, dim={d}, tables={G}x{K}, kernel={self.kernel}"
