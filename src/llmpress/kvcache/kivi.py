"""KIVI (Liu et al., 2024): asymmetric low-bit K/V with keys per channel and values per token.

Keys have outlier *channels* (a few channels large at every token), so a key group is G
consecutive tokens of one channel: scale and zero point per (channel, G tokens). Values have
no channel structure but multiply attention probabilities token by token, so a value group is
``group`` channels of one token. Integers are asymmetric ``b``-bit codes
``q = clamp(round((x - min) / s), 0, 2^b - 1)`` with ``s = (max - min) / (2^b - 1)``, so the
dequantization error of each element is at most ``s / 2``. Codes are packed into int32 words
(``llmpress.quant.pack``): the bytes held really shrink. The most recent tokens stay in the
model's precision (the residual, R tokens): they get the most attention and the key groups
fill there before they are quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.pack import pack_codes, unpack_codes


@dataclass(kw_only=True)
class Packed:
    """Codes of a tensor whose last dimension has ``n`` entries, packed, with scale and min
    broadcastable against the unpacked codes."""

    codes: torch.Tensor  # int32
    scale: torch.Tensor  # model dtype (float16-like storage: kept in the cache dtype)
    low: torch.Tensor
    n: int
    bits: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.low))


def _quant(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qmax = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    s = ((hi - lo) / qmax).clamp_min(1e-8)
    q = torch.clamp(torch.round((x - lo) / s), 0, qmax)
    return q, s, lo


def quantize_keys(k: torch.Tensor, bits: int) -> Packed:
    """k [B, H, G, D] (one group of G tokens): per channel over the G tokens."""
    kf = k.float()
    q, s, lo = _quant(kf, dim=-2, bits=bits)  # s, lo: [B, H, 1, D]
    return Packed(codes=pack_codes(q.to(torch.int64), bits), scale=s.to(k.dtype), low=lo.to(k.dtype), n=k.shape[-1], bits=bits)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> Packed:
    """v [B, H, T, D]: per token, ``group`` channels at a time."""
    B, H, T, D = v.shape
    vf = v.float().reshape(B, H, T, D // group, group)
    q, s, lo = _quant(vf, dim=-1, bits=bits)  # [B, H, T, D/g, 1]
    return Packed(codes=pack_codes(q.reshape(B, H, T, D).to(torch.int64), bits), scale=s.to(v.dtype), low=lo.to(v.dtype), n=D, bits=bits)


def dequantize_keys(p: Packed, dtype: torch.dtype) -> torch.Tensor:
    q = unpack_codes(p.codes, p.bits, p.n).to(torch.float32)
    return (q * p.scale.float() + p.low.float()).to(dtype)


def dequantize_values(p: Packed, group: int, dtype: torch.dtype) -> torch.Tensor:
    q = unpack_codes(p.codes, p.bits, p.n).to(torch.float32)
    B, H, T, D = q.shape
    x = q.reshape(B, H, T, D // group, group) * p.scale.float() + p.low.float()
    return x.reshape(B, H, T, D).to(dtype)


class KIVIStore:
    """One layer's K/V: quantized groups of G tokens (oldest first), then the residual in the
    model's precision. The residual keeps between R and R + G - 1 tokens once that many were
    seen: when it reaches R + G, its oldest G tokens are quantized (keys per channel over the
    G tokens, values per token)."""

    def __init__(self, *, bits: int, group: int, residual: int):
        self.bits, self.group, self.residual = bits, group, residual
        self.kq: list[Packed] = []
        self.vq: list[Packed] = []
        self.k: torch.Tensor | None = None  # residual [B, H, r, D]
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.kq) * self.group + (0 if self.k is None else self.k.shape[-2])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
        G = self.group
        while self.k.shape[-2] >= self.residual + G:
            self.kq.append(quantize_keys(self.k[:, :, :G], self.bits))
            self.vq.append(quantize_values(self.v[:, :, :G], self.bits, G))
            self.k, self.v = self.k[:, :, G:].contiguous(), self.v[:, :, G:].contiguous()

    def drop_oldest_groups(self, n: int) -> None:
        """Forget the ``n`` oldest quantized groups (eviction composes at group granularity)."""
        del self.kq[:n]
        del self.vq[:n]

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's K and V, dequantized (oldest first) [B, H, T, D]."""
        dt = self.k.dtype
        ks = [dequantize_keys(p, dt) for p in self.kq] + [self.k]
        vs = [dequantize_values(p, self.group, dt) for p in self.vq] + [self.v]
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def nbytes(self) -> int:
        res = 0 if self.k is None else self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        return res + sum(p.nbytes() for p in self.kq) + sum(p.nbytes() for p in self.vq)
