"""Integer-grid codec maths (pure functions): codes <-> packed unsigned words, the grid
with an optional column -> group index, and the decoded form runtime modules compute with.

The layout (``qweight``, ``scale``, ``zero_point``, ``g_idx``, ``exc_index``/``exc_value``)
is described in :mod:`llmpress.storage.forms.int_grid`, the form that stores it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..quant.args import QuantArgs
from ..quant.core import QParams, dequantize, quantize
from ..quant.pack import pack_codes, unpack_codes
from .form import LinearSpec


def words(n: int, bits: int) -> int:
    """int32 words that hold ``n`` codes of ``bits`` bits (whole blocks of 32 codes)."""
    return -(-n // 32) * bits


# ---- integer codes <-> unsigned storage codes ------------------------------------------


def code_offset(args: QuantArgs) -> int:
    """What :func:`pack_codes` adds to make a code unsigned (binary is mapped separately)."""
    if args.kind == "ternary":
        return 1
    if args.kind == "binary":
        return 0
    return -args.qmin


def to_unsigned(codes: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    c = codes.to(torch.int64)
    return (c + 1) // 2 if args.kind == "binary" else c + code_offset(args)


def from_unsigned(u: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    return 2 * u - 1 if args.kind == "binary" else u - code_offset(args)


def pack(codes: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    return pack_unsigned(to_unsigned(codes, args), args.bits)


def pack_unsigned(u: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` of unsigned codes; byte-level fast path for 1/2/4/8 bits (same words)."""
    if bits not in (1, 2, 4, 8) or sys.byteorder != "little":
        return pack_codes(u, bits)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    *lead, n = u.shape
    u = torch.nn.functional.pad(u.to(torch.uint8), (0, (-n) % 32))
    per = 8 // bits
    parts = u.reshape(*lead, -1, per)
    byte = parts[..., 0].clone()
    for i in range(1, per):
        byte |= parts[..., i] << (i * bits)
    return byte.contiguous().view(torch.int32)


def unpack_unsigned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unsigned codes [..., n] of :func:`pack_codes` words (int16 up to 15 bits, int32 for 16:
    codebook indices); byte-split fast path for 1/2/4/8 bits (the stream is little-endian,
    code i at bit i*bits)."""
    if bits in (1, 2, 4, 8) and sys.byteorder == "little" and packed.dtype == torch.int32:
        per = 8 // bits
        b = packed.contiguous().view(torch.uint8).to(torch.int16)  # [..., 4 * words]
        shifts = torch.arange(0, 8, bits, dtype=torch.int16)
        u = (b.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., bytes, per]
        u = u.reshape(*packed.shape[:-1], packed.shape[-1] * 4 * per)
        if u.shape[-1] < n:
            raise ValueError(f"packed tensor holds {u.shape[-1]} codes, fewer than n={n}")
        return u[..., :n]
    return unpack_codes(packed, bits, n).to(torch.int16 if bits < 16 else torch.int32)


_BITS_OF_BYTE: torch.Tensor | None = None


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean [..., n] of 1-bit :func:`pack_unsigned` words: each byte looked up in a 256 x 8
    table (about 9x faster than :func:`unpack_unsigned` at 1 bit, which widens to int16)."""
    global _BITS_OF_BYTE
    if sys.byteorder != "little" or packed.dtype != torch.int32:
        return unpack_unsigned(packed, 1, n).bool()
    if _BITS_OF_BYTE is None:
        _BITS_OF_BYTE = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()
    b = packed.contiguous().view(torch.uint8)
    bits = _BITS_OF_BYTE[b.long()].reshape(*packed.shape[:-1], -1)
    if bits.shape[-1] < n:
        raise ValueError(f"packed tensor holds {bits.shape[-1]} codes, fewer than n={n}")
    return bits[..., :n]


# ---- quantization grid with an optional column -> group index ---------------------------


def _columns(t: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Per-group params [R, G] -> per-column [R, in] following ``g_idx``."""
    return t[:, g_idx.long()]


def codes_of(weight: torch.Tensor, qp: QParams, args: QuantArgs, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (float tensor) of an already quantized weight."""
    if g_idx is None:
        return quantize(weight, QParams(scale=qp.scale, zero_point=qp.zero_point), args)
    w = weight.float()
    s = _columns(qp.scale, g_idx)
    if args.kind == "binary":
        return torch.where(w >= 0, 1.0, -1.0)
    if args.kind == "ternary":
        return torch.round(w / s).clamp(-1, 1)
    z = 0 if qp.zero_point is None else _columns(qp.zero_point, g_idx)
    return torch.clamp(torch.round(w / s) + z, args.qmin, args.qmax)


def dequant(codes: torch.Tensor, qp: QParams, args: QuantArgs, g_idx: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
    """The weight of ``codes`` (same arithmetic as :func:`llmpress.quant.core.dequantize`)."""
    if g_idx is None:
        return dequantize(codes, qp, args, dtype)
    q = codes.float()
    if qp.zero_point is not None:
        q = q - _columns(qp.zero_point, g_idx)
    return (q * _columns(qp.scale, g_idx)).to(dtype)


def zero_code(qp: QParams, args: QuantArgs, shape: tuple[int, int]) -> torch.Tensor:
    """Per-weight code whose value is exactly 0 (0, or the zero point)."""
    if qp.zero_point is None:
        return torch.zeros(shape)
    g = {"tensor": shape[0] * shape[1], "channel": shape[1]}.get(args.granularity, args.group_size)
    return qp.zero_point.unsqueeze(-1).expand(*qp.zero_point.shape, g).reshape(shape)


@dataclass(kw_only=True)
class Decoded:
    """A quantized linear in compute-friendly form: int8 codes and float32 qparams."""

    codes: torch.Tensor  # int8 [out, in] (signed codes, binary as -1/1)
    qparams: QParams  # scale [R, G] float32, zero_point [R, G] float32 or None
    args: QuantArgs
    g_idx: torch.Tensor | None = None  # int32 [in]
    exc_index: torch.Tensor | None = None  # int64 flat positions
    exc_value: torch.Tensor | None = None


def decode_qparams(spec: LinearSpec, t: dict[str, torch.Tensor]) -> QParams:
    zp = None
    if spec.weight_args.has_zero_point:
        r, _ = spec.scale_shape
        zp = unpack_unsigned(t["zero_point"], spec.weight_args.bits, r).t().float().contiguous()
    return QParams(scale=t["scale"].float(), zero_point=zp)


def decode_quant(spec: LinearSpec, t: dict[str, torch.Tensor]) -> Decoded:
    a = spec.weight_args
    u = unpack_unsigned(t["qweight"], a.bits, spec.in_features)
    codes = from_unsigned(u, a).to(torch.int8 if a.bits < 8 or a.symmetric else torch.int16)
    return Decoded(
        codes=codes, qparams=decode_qparams(spec, t), args=a, g_idx=t.get("g_idx"), exc_index=t.get("exc_index"), exc_value=t.get("exc_value")
    )


def dequant_decoded(d: Decoded, dtype=torch.float32) -> torch.Tensor:
    w = dequant(d.codes, d.qparams, d.args, d.g_idx, dtype)
    if d.exc_index is not None:
        w.view(-1)[d.exc_index] = d.exc_value.to(dtype)
    return w
