"""A low-rank linear at run time: ``y = (x B^T) A^T + bias``, two small matmuls instead of one
[out, in] one (r(out + in) multiply-adds per token instead of out * in).

Each factor is a linear module of its own: float factors a
:class:`~llmpress.runtime.qlinear.DequantLinear` over the dense tensor; quantized factors the
module their grid's storage form builds (llmpress's int4 kernel for 4-bit groups of a multiple
of 32, ...), so a served W4 factor stays 4-bit in memory. A factor module can be shared: QSVD's
k_proj and v_proj hold the very module of q_proj's ``B``."""

from __future__ import annotations

import torch
import torch.nn as nn


def _factor_module(f: torch.Tensor | nn.Module) -> nn.Module:
    from .qlinear import DequantLinear

    if isinstance(f, nn.Module):
        return f
    if f.dim() != 2:
        raise ValueError(f"a low-rank factor is a matrix, found shape {tuple(f.shape)}")
    return DequantLinear(f.detach().contiguous())


class LowRankLinear(nn.Module):
    def __init__(self, A: torch.Tensor | nn.Module, B: torch.Tensor | nn.Module, bias: torch.Tensor | None = None):
        super().__init__()
        a, b = _factor_module(A), _factor_module(B)
        if a.in_features != b.out_features:
            raise ValueError(f"low-rank factors of shapes {(a.out_features, a.in_features)} and {(b.out_features, b.in_features)} do not chain")
        self.out_features, self.rank, self.in_features = a.out_features, a.in_features, b.in_features
        self.a, self.b = a, b
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        fk = getattr(b, "kernel", "dequant")
        self.kernel = "lowrank" if fk == "dequant" and getattr(b, "args", None) is None else f"lowrank/{fk}"

    @property
    def A(self) -> torch.Tensor:
        """The left factor [out, rank] as float32 (the stored tensor itself for float factors)."""
        return self.a.dequantized_weight()

    @property
    def B(self) -> torch.Tensor:
        """The right factor [rank, in] as float32 (the stored tensor itself for float factors)."""
        return self.b.dequantized_weight()

    @property
    def weight(self) -> torch.Tensor:
        """The dense product (rebuilt on each access: for inspection, not for the hot path)."""
        return self.A @ self.B

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """``x B^T``: the rank-r latent (what QSVD's cache keeps)."""
        return self.b(x)

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        """``h A^T + bias`` from a latent ``h``."""
        y = self.a(h)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.latent(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}, kernel={self.kernel}"
