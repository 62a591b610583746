"""Pack integer codes into int32 words and back, exactly, for any width 1-16 bits (weight
grids use 1-8; codebook indices up to 16, e.g. 2^16-entry codebooks).

Codes are first made unsigned (symmetric codes are offset by 2^(b-1)). Each run of 32
consecutive codes along the last dimension becomes ``b`` int32 words holding a 32*b-bit
little-endian stream: code j occupies bits [j*b, (j+1)*b). For b in {1, 2, 4, 8} this is
the usual layout (32/b codes per word, code i at bit i*b).
"""

from __future__ import annotations

import torch

MAX_BITS = 16
# int64 temporaries per slice of rows: packing spreads every code into int64 bits (8 * bits
# bytes per code), so a 14336 x 4096 matrix at once would take 3.8 GB; slices keep it at 64 MB
CHUNK_ELEMENTS = 1 << 23


def _by_rows(fn, t: torch.Tensor, per_row: int, *args) -> torch.Tensor:
    """``fn(t, *args)`` on slices of ``t``'s rows (all but the last dimension flattened) of at
    most ``CHUNK_ELEMENTS`` temporaries (``per_row`` each row), the same result as one call."""
    rows = t.numel() // max(1, t.shape[-1]) if t.dim() else 1
    if t.dim() < 2 or rows * per_row <= CHUNK_ELEMENTS:
        return fn(t, *args)
    lead = t.shape[:-1]
    flat = t.reshape(-1, t.shape[-1])
    step = max(1, CHUNK_ELEMENTS // max(1, per_row))
    out = torch.cat([fn(flat[i : i + step], *args) for i in range(0, flat.shape[0], step)])
    return out.reshape(*lead, out.shape[-1])


def pack_codes(codes: torch.Tensor, bits: int, offset: int = 0) -> torch.Tensor:
    """codes [..., n] (integers in [-offset, 2^bits - offset)) -> int32 [..., ceil(n/32) * bits]."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits}: packing supports 1 to {MAX_BITS} bits")
    return _by_rows(_pack, codes, (codes.shape[-1] + 31) // 32 * 32 * bits if codes.dim() else 0, bits, offset)


def _pack(codes: torch.Tensor, bits: int, offset: int) -> torch.Tensor:
    u = codes.to(torch.int64) + offset
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing with offset {offset}")
    *lead, n = u.shape
    pad = (-n) % 32
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    chunks = u.reshape(*lead, -1, 32)  # [..., C, 32]
    shifts = torch.arange(bits, dtype=torch.int64)
    bitsarr = (chunks.unsqueeze(-1) >> shifts) & 1  # [..., C, 32, b]
    stream = bitsarr.reshape(*lead, chunks.shape[-2], bits, 32)  # 32*b bits as b words of 32
    words = (stream << torch.arange(32, dtype=torch.int64)).sum(-1)  # [..., C, b] in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(*lead, -1).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, n: int, offset: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 [..., C*bits] -> int64 codes [..., n]."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits}: packing supports 1 to {MAX_BITS} bits")
    if packed.shape[-1] % bits:
        raise ValueError(f"packed length {packed.shape[-1]} is not a multiple of bits={bits}")
    return _by_rows(_unpack, packed, packed.shape[-1] * 32 if packed.dim() else 0, bits, n, offset)


def _unpack(packed: torch.Tensor, bits: int, n: int, offset: int) -> torch.Tensor:
    *lead, m = packed.shape
    if m % bits:
        raise ValueError(f"packed length {m} is not a multiple of bits={bits}")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    words = w.reshape(*lead, m // bits, bits, 1)
    bitsarr = (words >> torch.arange(32, dtype=torch.int64)) & 1  # [..., C, b, 32]
    bitsarr = bitsarr.reshape(*lead, m // bits, 32, bits)
    codes = (bitsarr << torch.arange(bits, dtype=torch.int64)).sum(-1).reshape(*lead, -1)
    if codes.shape[-1] < n:
        raise ValueError(f"packed tensor holds {codes.shape[-1]} codes, fewer than n={n}")
    return codes[..., :n] - offset
