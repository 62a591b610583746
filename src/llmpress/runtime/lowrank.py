"""A low-rank linear at run time: ``y = (x B^T) A^T + bias``, two small matmuls instead of one
[out, in] one (r(out + in) multiply-adds per token instead of out * in)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LowRankLinear(nn.Module):
    kernel = "lowrank"

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(f"low-rank factors of shapes {tuple(A.shape)} and {tuple(B.shape)} do not chain")
        self.out_features, self.rank, self.in_features = A.shape[0], A.shape[1], B.shape[1]
        self.register_buffer("A", A.detach().contiguous(), persistent=False)
        self.register_buffer("B", B.detach().contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense product (rebuilt on each access: for inspection, not for the hot path)."""
        return self.A @ self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.B.to(x.dtype))
        return F.linear(h, self.A.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}"
