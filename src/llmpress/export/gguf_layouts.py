"""Byte layouts of GGUF block types (``ggml-common.h``), as pure functions from llmpress's
codes and scales to uint8 blocks; which grid maps to which type, and the check that the
mapping is exact, are :mod:`llmpress.export.gguf_blocks`'.

Blocks run along a row (the input dimension). Codes are signed llmpress codes; each type
stores them unsigned:

- ``Q4_0`` (32 weights, 18 bytes): fp16 ``d``; 16 bytes of nibbles, byte j holding weight j
  (low nibble) and j + 16 (high); value ``(u - 8) * d``;
- ``Q4_1`` (20 bytes): fp16 ``d``, fp16 ``m``, nibbles as ``Q4_0``; value ``u * d + m``;
- ``Q5_0`` (22 bytes): fp16 ``d``; a little-endian uint32 whose bit j is bit 4 of weight j;
  the low nibbles as ``Q4_0``; value ``(u - 16) * d``;
- ``Q5_1`` (24 bytes): fp16 ``d``, fp16 ``m``, then as ``Q5_0``; value ``u * d + m``;
- ``Q8_0`` (34 bytes): fp16 ``d``, 32 int8 codes; value ``q * d``;
- ``Q6_K`` (256 weights in 16 groups of 16, 210 bytes): 128 bytes ``ql``, 64 bytes ``qh``,
  16 int8 group scales ``sc``, fp16 ``d``; value ``d * sc[j // 16] * (u - 32)``. Weight
  ``w = 128 h + 64 s + j`` (h, s in {0, 1}, j < 64) has its low 4 bits in ``ql[64 h + j]``
  at bit ``4 s``; weight ``w = 128 h + 32 t + j`` (t < 4, j < 32) its high 2 bits in
  ``qh[32 h + j]`` at bit ``2 t``.
- ``Q4_K`` (256 weights in 8 groups of 32, 144 bytes): fp16 ``d``, fp16 ``dmin``, 12 bytes of
  6-bit unsigned group scales ``sc`` and minimums ``m``, 128 bytes of nibbles; value
  ``d * sc[j // 32] * u - dmin * m[j // 32]``, ``u`` in 0..15. Group ``g < 4`` has ``sc`` in
  the low 6 bits of byte ``g``, ``m`` in those of byte ``g + 4``; group ``g >= 4`` has the low
  4 bits of ``sc`` / ``m`` in the low / high nibble of byte ``g + 4`` and their top 2 bits in
  the top 2 bits of byte ``g - 4`` / ``g``. Weight ``64 c + 32 h + j`` (c < 4, h in {0, 1},
  j < 32) is nibble ``h`` of byte ``32 c + j``.
- ``Q2_K`` (256 weights in 16 groups of 16, 84 bytes): 16 bytes of 4-bit ``sc`` (low nibble)
  and ``m`` (high nibble), 64 bytes ``qs``, fp16 ``d``, fp16 ``dmin``; value
  ``d * sc * u - dmin * m``, ``u`` in 0..3; weight ``128 c + 32 t + j`` at bit ``2 t`` of
  ``qs[32 c + j]``.
- ``Q3_K`` (256 weights in 16 groups of 16, 110 bytes): 32 bytes ``hmask``, 64 bytes ``qs``,
  12 bytes of 6-bit group scales (stored ``sc + 32``), fp16 ``d``; value
  ``d * sc[j // 16] * (u - 4)``, ``u`` in 0..7. Weight ``w = 128 c + 32 t + j`` (c in {0, 1},
  t < 4, j < 32) has its low 2 bits in ``qs[32 c + j]`` at bit ``2 t`` and its bit 2 in
  ``hmask[j]`` at bit ``4 c + t``; scale ``g`` has its low 4 bits in nibble ``g // 8`` of byte
  ``g % 8`` and its top 2 bits in byte ``8 + g % 4`` at bit ``2 (g // 4)``.
- ``IQ4_NL`` (32 weights, 18 bytes): fp16 ``d``, nibbles as ``Q4_0``; value ``d * K[u]``, K
  the 16-level table of :mod:`llmpress.quant.iq4`;
- ``IQ4_XS`` (256 weights in 8 blocks of 32, 136 bytes): fp16 ``d``, a little-endian uint16 holding
  the top 2 bits of block ``b``'s 6-bit scale ``sc + 32`` at bit ``2 b``, 4 bytes of their low
  4 bits (block ``b`` in nibble ``b % 2`` of byte ``b // 2``), then each block's 16 bytes of
  nibbles as ``IQ4_NL``; value ``(d * sc) * K[u]``.
- ``Q5_K`` (256 weights, 176 bytes): ``Q4_K``'s ``d``, ``dmin`` and 12 scale bytes, then 32
  bytes ``qh``, then ``Q4_K``'s 128 bytes of low nibbles; ``u`` in 0..31, weight ``32 g + j``
  (group g < 8, j < 32) has its bit 4 at bit ``g`` of ``qh[j]``.
"""

from __future__ import annotations

import numpy as np
import torch

QK = 32  # weights per block of Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0
QK_K = 256  # weights per super-block of the K-quants
OFFSET = {
    "Q4_0": 8,
    "Q4_1": 0,
    "Q5_0": 16,
    "Q5_1": 0,
    "Q8_0": 0,
    "Q6_K": 32,
    "Q2_K": 0,
    "Q3_K": 4,
    "Q4_K": 0,
    "Q5_K": 0,
}  # unsigned = signed code + offset


def fp16_exact(x: torch.Tensor) -> bool:
    h = x.to(torch.float16)
    return bool(torch.isfinite(h).all()) and torch.equal(h.float(), x.float())


def fp16_bytes(x: torch.Tensor) -> np.ndarray:
    """float32 [...] -> uint8 [..., 2] of its float16 values (little-endian)."""
    return x.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*x.shape, 2)


def nibbles(u: torch.Tensor) -> np.ndarray:
    """uint8 codes [..., 32] (their low 4 bits) -> [..., 16]: weight j low nibble, j + 16 high."""
    u = u.to(torch.uint8) & 15
    return (u[..., : QK // 2] | (u[..., QK // 2 :] << 4)).contiguous().numpy()


def fifth_bits(u: torch.Tensor) -> np.ndarray:
    """uint8 codes 0..31 [..., 32] -> [..., 4]: a little-endian uint32, bit j = bit 4 of weight j."""
    bits = ((u.to(torch.int16) >> 4) & 1).reshape(*u.shape[:-1], 4, 8)  # byte k holds weights 8k .. 8k + 7
    return (bits << torch.arange(8, dtype=torch.int16)).sum(-1).to(torch.uint8).contiguous().numpy()


def small_blocks(qtype: str, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> np.ndarray:
    """Blocks of 32 [R, G, bytes] from codes [R, G, 32], scales [R, G] and (``Q4_1`` /
    ``Q5_1``) minimums [R, G], all already checked representable."""
    u = codes.to(torch.int16) + OFFSET[qtype]
    heads = [fp16_bytes(scale)] + ([fp16_bytes(minimum)] if minimum is not None else [])
    if qtype == "Q8_0":
        body = [codes.to(torch.int8).contiguous().numpy().view(np.uint8)]
    elif qtype in ("Q5_0", "Q5_1"):
        body = [fifth_bits(u), nibbles(u)]
    else:
        body = [nibbles(u)]
    return np.concatenate([*heads, *body], axis=-1)


def iq4_nl_blocks(codes: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """``IQ4_NL`` blocks [R, G, 18] from codes 0..15 [R, G, 32] and fp16-valued ``d`` [R, G]."""
    return np.concatenate([fp16_bytes(d), nibbles(codes)], axis=-1)


def iq4_xs_blocks(codes: torch.Tensor, d: torch.Tensor, sc: torch.Tensor) -> np.ndarray:
    """``IQ4_XS`` blocks [R, n, 136] from codes 0..15 [R, n, 256], fp16-valued ``d`` [R, n] and
    6-bit signed ``sc`` [R, n, 8]."""
    R, n, _ = codes.shape
    v = (sc.to(torch.int32) + 32).clamp(0, 63)  # [.., 8]
    high = ((v >> 4) << (2 * torch.arange(8, dtype=torch.int32))).sum(-1)  # uint16: block b at bit 2 b
    high_bytes = torch.stack([high & 255, high >> 8], dim=-1).to(torch.uint8)
    low = (v & 15).to(torch.uint8)
    low_bytes = low[..., 0::2] | (low[..., 1::2] << 4)
    qs = nibbles(codes.reshape(R, n, 8, 32)).reshape(R, n, 128)
    return np.concatenate([fp16_bytes(d), high_bytes.contiguous().numpy(), low_bytes.contiguous().numpy(), qs], axis=-1)


def q6_k_scales(scale: torch.Tensor, code_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Group scales [R, n, 16] of super-blocks -> (fp16-valued ``d`` [R, n], ``code_bits``-wide
    signed ``sc`` [R, n, 16]; ``Q6_K`` 8, ``Q3_K`` 6) with ``d * sc`` equal to them bit for
    bit, or None. ``d`` is the super-block's signed extreme over -2^(b-1) (what llmpress's
    ``super_block`` grid stores)."""
    top = 2 ** (code_bits - 1)
    idx = scale.abs().argmax(-1, keepdim=True)
    d = scale.gather(-1, idx) / -top
    sc = torch.round(scale / d)
    if not (fp16_exact(d) and bool((d != 0).all()) and bool(((sc >= -top) & (sc <= top - 1)).all())):
        return None
    if not torch.equal(d * sc, scale):
        return None
    return d.squeeze(-1), sc


def q6_k_blocks(codes: torch.Tensor, d: torch.Tensor, sc: torch.Tensor) -> np.ndarray:
    """``Q6_K`` blocks [R, n, 210] from codes -32..31 [R, n, 256], ``d`` [R, n], ``sc`` [R, n, 16]."""
    R, n, _ = codes.shape
    u = (codes.to(torch.int16) + OFFSET["Q6_K"]).to(torch.uint8).reshape(R, n, 2, 128)  # [.., h, 128]
    low, high = u & 15, u >> 4
    ql = low[..., :64] | (low[..., 64:] << 4)  # [.., h, 64]: weight 64 s + j at bit 4 s
    hq = high.reshape(R, n, 2, 4, 32)  # [.., h, t, 32]
    qh = hq[..., 0, :] | (hq[..., 1, :] << 2) | (hq[..., 2, :] << 4) | (hq[..., 3, :] << 6)
    parts = [
        ql.reshape(R, n, 128).contiguous().numpy(),
        qh.reshape(R, n, 64).contiguous().numpy(),
        sc.to(torch.int8).contiguous().numpy().view(np.uint8),
        fp16_bytes(d),
    ]
    return np.concatenate(parts, axis=-1)


def _two_bit_planes(u: torch.Tensor) -> torch.Tensor:
    """Codes 0..3 [R, n, 256] -> uint8 [R, n, 64]: weight ``128 c + 32 t + j`` at bit ``2 t`` of byte ``32 c + j``."""
    R, n, _ = u.shape
    u = (u.to(torch.int16) & 3).reshape(R, n, 2, 4, 32)  # [.., c, t, j]
    shift = torch.arange(4, dtype=torch.int16).reshape(4, 1)
    return (u << (2 * shift)).sum(-2).to(torch.uint8).reshape(R, n, 64)


def q2_k_blocks(codes: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """``Q2_K`` blocks [R, n, 84] from unsigned codes 0..3 [R, n, 256], fp16-valued ``d`` /
    ``dmin`` [R, n] and 4-bit ``sc`` / ``m`` [R, n, 16] (value ``d * sc * u - dmin * m``)."""
    scales = (sc.to(torch.uint8) & 15) | ((m.to(torch.uint8) & 15) << 4)
    return np.concatenate([scales.contiguous().numpy(), _two_bit_planes(codes).numpy(), fp16_bytes(d), fp16_bytes(dmin)], axis=-1)


def q3_k_blocks(codes: torch.Tensor, d: torch.Tensor, sc: torch.Tensor) -> np.ndarray:
    """``Q3_K`` blocks [R, n, 110] from codes -4..3 [R, n, 256], ``d`` [R, n], ``sc`` -32..31 [R, n, 16]."""
    R, n, _ = codes.shape
    u = codes.to(torch.int16) + OFFSET["Q3_K"]
    qs = _two_bit_planes(u)  # the low 2 bits
    hbit = ((u >> 2) & 1).reshape(R, n, 8, 32)  # [.., 4 c + t, j]: weight 128 c + 32 t + j
    hmask = (hbit << torch.arange(8, dtype=torch.int16).reshape(8, 1)).sum(-2).to(torch.uint8)
    v = (sc.to(torch.int16) + 32).to(torch.uint8)  # 0..63
    low = v & 15
    lows = low[..., :8] | (low[..., 8:] << 4)  # byte g % 8, nibble g // 8
    high = (v >> 4).reshape(R, n, 4, 4)  # [.., g // 4, g % 4]
    highs = (high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)).to(torch.uint8)
    parts = [
        hmask.contiguous().numpy(),
        qs.reshape(R, n, 64).contiguous().numpy(),
        lows.contiguous().numpy(),
        highs.contiguous().numpy(),
        fp16_bytes(d),
    ]
    return np.concatenate(parts, axis=-1)


def k_scale_bytes(sc: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """The 12 bytes of 6-bit group scales and minimums [R, n, 8] of a ``Q4_K`` / ``Q5_K`` block."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    scales = torch.cat(
        [
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),  # bytes 0-3
            (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),  # bytes 4-7
            (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),  # bytes 8-11
        ],
        dim=-1,
    )
    return scales.contiguous().numpy()


def _k_nibbles(u: torch.Tensor) -> np.ndarray:
    """The 128 bytes of low nibbles of unsigned codes [R, n, 256]: weight ``64 c + 32 h + j`` in
    nibble ``h`` of byte ``32 c + j``."""
    R, n, _ = u.shape
    u = (u.to(torch.uint8) & 15).reshape(R, n, 4, 2, 32)  # [.., c, h, j]
    return (u[..., 0, :] | (u[..., 1, :] << 4)).reshape(R, n, 128).contiguous().numpy()


def q4_k_blocks(codes: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """``Q4_K`` blocks [R, n, 144] from unsigned codes 0..15 [R, n, 256], fp16-valued ``d`` and
    ``dmin`` [R, n], 6-bit ``sc`` and ``m`` [R, n, 8] (value ``d * sc * u - dmin * m``)."""
    return np.concatenate([fp16_bytes(d), fp16_bytes(dmin), k_scale_bytes(sc, m), _k_nibbles(codes)], axis=-1)


def q5_k_blocks(codes: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """``Q5_K`` blocks [R, n, 176] from unsigned codes 0..31 [R, n, 256] and the grid as :func:`q4_k_blocks`."""
    R, n, _ = codes.shape
    high = ((codes.to(torch.int16) >> 4) & 1).reshape(R, n, 8, 32)  # [.., g, j]
    qh = (high << torch.arange(8, dtype=torch.int16).reshape(8, 1)).sum(-2).to(torch.uint8)  # [.., j]: bit g
    return np.concatenate([fp16_bytes(d), fp16_bytes(dmin), k_scale_bytes(sc, m), qh.contiguous().numpy(), _k_nibbles(codes)], axis=-1)
