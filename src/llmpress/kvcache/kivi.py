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

The store keeps its quantized part in a few contiguous tensors (codes, scales and minima of K
and of V, all groups oldest first): appending quantizes every completed group at once,
:meth:`KIVIStore.full` dequantizes them all with a handful of tensor ops, and eviction slices.
Nothing is kept dequantized across steps: beyond the residual only codes, scales and minima.

Pre-RoPE keys (KVQuant, Hooper et al., 2024; ``inv_freq`` given): a key group is quantized
after undoing its rotary rotation (each token rotated back by its own position) and rotated
forward again when dequantized. Before RoPE a key channel holds a steady value across tokens
(its outliers too); after RoPE each pair of channels turns at its own frequency, so one
channel's range over G tokens spans the pair's whole circle and a 2-bit grid wastes most of
its levels. Rotations are orthogonal and both directions use the same angles, so nothing but
the quantization error changes; the residual stays as the model gave it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.pack import pack_codes, unpack_codes
from .rope import shift_keys


@dataclass(kw_only=True)
class Packed:
    """Codes of a tensor whose last dimension has ``n`` entries, packed, with scale and min
    broadcastable against the unpacked codes (keys: one scale row per group of tokens, see
    :func:`dequantize_keys`)."""

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


def quantize_keys(k: torch.Tensor, bits: int, group: int | None = None) -> Packed:
    """k [B, H, T, D]: per channel over each run of ``group`` tokens (None: one group of all
    T tokens). Scale and min [B, H, T / group, D]."""
    B, H, T, D = k.shape
    G = T if group is None else group
    kf = k.float().reshape(B, H, T // G, G, D)
    q, s, lo = _quant(kf, dim=-2, bits=bits)  # s, lo: [B, H, T/G, 1, D]
    codes = pack_codes(q.reshape(B, H, T, D).to(torch.int64), bits)
    return Packed(codes=codes, scale=s.squeeze(-2).to(k.dtype), low=lo.squeeze(-2).to(k.dtype), n=D, bits=bits)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> Packed:
    """v [B, H, T, D]: per token, ``group`` channels at a time."""
    B, H, T, D = v.shape
    vf = v.float().reshape(B, H, T, D // group, group)
    q, s, lo = _quant(vf, dim=-1, bits=bits)  # [B, H, T, D/g, 1]
    return Packed(codes=pack_codes(q.reshape(B, H, T, D).to(torch.int64), bits), scale=s.to(v.dtype), low=lo.to(v.dtype), n=D, bits=bits)


def _codes(p: Packed) -> torch.Tensor:
    """The unpacked codes as float32 [..., n]: widths dividing 32 by shifts and a mask on the
    int32 words (the same integers as ``unpack_codes``, without its int64 bit planes)."""
    if 32 % p.bits:
        return unpack_codes(p.codes, p.bits, p.n).to(torch.float32)
    per = 32 // p.bits  # codes per word, code i of a word at bits [i*b, (i+1)*b)
    shifts = torch.arange(0, 32, p.bits, dtype=torch.int32, device=p.codes.device)
    q = (p.codes.unsqueeze(-1) >> shifts) & (2**p.bits - 1)
    return q.reshape(*p.codes.shape[:-1], p.codes.shape[-1] * per)[..., : p.n].to(torch.float32)


def dequantize_keys(p: Packed, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, T, D] from codes [B, H, T, *] and scale/min [B, H, T / G, D] (G = T / their rows)."""
    q = _codes(p)
    B, H, T, D = q.shape
    n = p.scale.shape[-2]
    x = q.reshape(B, H, n, T // n, D) * p.scale.float().unsqueeze(-2) + p.low.float().unsqueeze(-2)
    return x.reshape(B, H, T, D).to(dtype)


def dequantize_values(p: Packed, group: int, dtype: torch.dtype) -> torch.Tensor:
    q = _codes(p)
    B, H, T, D = q.shape
    x = q.reshape(B, H, T, D // group, group) * p.scale.float() + p.low.float()
    return x.reshape(B, H, T, D).to(dtype)


def _cat(a: Packed | None, b: Packed) -> Packed:
    if a is None:
        return b
    t = [torch.cat([x, y], dim=2) for x, y in ((a.codes, b.codes), (a.scale, b.scale), (a.low, b.low))]
    return Packed(codes=t[0], scale=t[1], low=t[2], n=a.n, bits=a.bits)


def _tail(p: Packed, codes_from: int, scale_from: int) -> Packed:
    """``p`` without its first token rows (copied, so the dropped rows' memory is released)."""
    return Packed(codes=p.codes[:, :, codes_from:].clone(), scale=p.scale[:, :, scale_from:].clone(),
                  low=p.low[:, :, scale_from:].clone(), n=p.n, bits=p.bits)  # fmt: skip


class KIVIStore:
    """One layer's K/V: quantized groups of G tokens (oldest first), then the residual in the
    model's precision. The residual keeps between R and R + G - 1 tokens once that many were
    seen: when it reaches R + G, its oldest G tokens are quantized (keys per channel over the
    G tokens, values per token). The quantized groups live in one :class:`Packed` for K (codes
    [B, H, N*G, *], scale/min [B, H, N, D]) and one for V (codes [B, H, N*G, *], scale/min
    [B, H, N*G, D/G, 1]), grown by concatenation: no spare capacity, so :meth:`nbytes` is
    what is held."""

    def __init__(self, *, bits: int, group: int, residual: int, inv_freq: torch.Tensor | None = None):
        self.bits, self.group, self.residual = bits, group, residual
        self.inv_freq = inv_freq  # given: keys quantized before RoPE (module doc)
        self.start = 0  # rotary position of the oldest token held (tokens held sit at consecutive positions)
        self.kq: Packed | None = None
        self.vq: Packed | None = None
        self.groups = 0  # quantized groups held
        self.k: torch.Tensor | None = None  # residual [B, H, r, D]
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.groups * self.group + (0 if self.k is None else self.k.shape[-2])

    def _positions(self, first: int, n: int, device) -> torch.Tensor:
        return torch.arange(self.start + first, self.start + first + n, device=device)

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: int | None = None) -> None:
        """Add tokens (oldest first); ``pos``: the rotary position of the first (needed for
        pre-RoPE keys when the store starts later than position 0, e.g. after sinks)."""
        if not len(self) and pos is not None:
            self.start = pos
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
        G = self.group
        n = max(0, (self.k.shape[-2] - self.residual) // G)  # the groups that leave the residual
        if not n:
            return
        kg = self.k[:, :, : n * G]
        if self.inv_freq is not None:  # back to before RoPE: each token rotated by minus its position
            kg = shift_keys(kg, -self._positions(self.groups * G, n * G, kg.device), self.inv_freq)
        self.kq = _cat(self.kq, quantize_keys(kg, self.bits, G))
        self.vq = _cat(self.vq, quantize_values(self.v[:, :, : n * G], self.bits, G))
        self.k, self.v = self.k[:, :, n * G :].contiguous(), self.v[:, :, n * G :].contiguous()
        self.groups += n

    def drop_oldest_groups(self, n: int) -> None:
        """Forget the ``n`` oldest quantized groups (eviction composes at group granularity)."""
        n = min(n, self.groups)
        if n <= 0:
            return
        G = self.group
        self.kq = _tail(self.kq, n * G, n) if n < self.groups else None
        self.vq = _tail(self.vq, n * G, n * G) if n < self.groups else None
        self.groups -= n
        self.start += n * G

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's K and V, dequantized (oldest first) [B, H, T, D]."""
        if self.kq is None:
            return self.k, self.v
        dt = self.k.dtype
        kq = dequantize_keys(self.kq, dt)
        if self.inv_freq is not None:
            kq = shift_keys(kq, self._positions(0, kq.shape[-2], kq.device), self.inv_freq)
        k = torch.cat([kq, self.k], dim=-2)
        v = torch.cat([dequantize_values(self.vq, self.group, dt), self.v], dim=-2)
        return k, v

    def nbytes(self) -> int:
        res = 0 if self.k is None else self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        return res + sum(p.nbytes() for p in (self.kq, self.vq) if p is not None)
