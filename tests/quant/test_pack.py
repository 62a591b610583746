"""Packing integer codes into int32 words: exact round trips and the documented bit layout."""

from __future__ import annotations

import pytest
import torch

from llmpress.quant import QuantArgs, compute_qparams, pack_codes, quantize, unpack_codes


def _stream_reference(codes: list[int], bits: int) -> list[int]:
    """Independent layout: per run of 32 codes, a little-endian 32*bits-bit integer split in words."""
    words = []
    for start in range(0, len(codes), 32):
        chunk = codes[start : start + 32] + [0] * (32 - len(codes[start : start + 32]))
        big = sum(c << (j * bits) for j, c in enumerate(chunk))
        for k in range(bits):
            w = (big >> (32 * k)) & 0xFFFFFFFF
            words.append(w - 2**32 if w >= 2**31 else w)
    return words


@pytest.mark.parametrize("bits", range(1, 17))  # 9-16: codebook indices (up to 2^16 entries)
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 64, 100, 257])
def test_round_trip_unsigned(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, n), generator=g)
    codes[0, 0] = 2**bits - 1  # both extremes present
    codes[-1, -1] = 0
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, -(-n // 32) * bits)
    back = unpack_codes(packed, bits, n)
    assert back.dtype == torch.int64
    assert torch.equal(back, codes)
    # the layout is the documented bit stream
    for r in range(3):
        assert packed[r].tolist() == _stream_reference(codes[r].tolist(), bits)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [5, 45, 96])
def test_round_trip_signed_with_offset(bits, n):
    off = 2 ** (bits - 1)
    g = torch.Generator().manual_seed(bits + n)
    codes = torch.randint(-off, 2**bits - off, (2, 4, n), generator=g)
    codes[0, 0, 0], codes[1, 3, -1] = -off, 2**bits - off - 1
    packed = pack_codes(codes, bits, offset=off)
    assert packed.shape == (2, 4, -(-n // 32) * bits)
    assert torch.equal(unpack_codes(packed, bits, n, offset=off), codes)
    # the offset is applied before packing: same words as the shifted unsigned codes
    assert torch.equal(packed, pack_codes(codes + off, bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_of_real_quantized_codes(bits):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(bits))
    args = QuantArgs(bits=bits, group_size=32)
    codes = quantize(w, compute_qparams(w, args), args)
    assert int(codes.min()) == args.qmin or int(codes.min()) == -args.qmax
    packed = pack_codes(codes, bits, offset=-args.qmin)
    assert packed.numel() * 32 == codes.numel() * bits  # no padding: 96 = 3 * 32
    assert torch.equal(unpack_codes(packed, bits, 96, offset=-args.qmin).float(), codes)


def test_4bit_layout_is_8_codes_per_word_code_i_at_bits_4i():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 9] + [0] * 8 + [0xA, 0, 0, 0, 0, 0, 0, 0xF])
    packed = pack_codes(codes, 4)
    assert packed.shape == (4,)
    # word k holds codes 8k..8k+7, code i of the word at bits 4i..4i+3
    expect = [0x87654321, 0x9000000F, 0x00000000, 0xF000000A]
    assert [w & 0xFFFFFFFF for w in packed.tolist()] == expect
    assert packed[0].item() == 0x87654321 - 2**32  # stored as signed int32
    assert torch.equal(unpack_codes(packed, 4, 32), codes)


def test_1_2_8_bit_layouts():
    assert [w & 0xFFFFFFFF for w in pack_codes(torch.tensor([1, 0, 1, 1] + [0] * 27 + [1]), 1).tolist()] == [0b1101 | (1 << 31)]
    assert [w & 0xFFFFFFFF for w in pack_codes(torch.tensor([3, 0, 2, 1] + [0] * 28), 2).tolist()] == [0b01_10_00_11, 0]
    p8 = pack_codes(torch.tensor([0x11, 0x22, 0x33, 0xFF] + [0] * 28), 8)
    assert p8.shape == (8,) and (p8[0].item() & 0xFFFFFFFF) == 0xFF332211 and p8[1:].eq(0).all()


def test_short_tail_pads_with_zeros_and_n_trims():
    codes = torch.tensor([7, 7, 7])
    packed = pack_codes(codes, 3)
    assert packed.shape == (3,)
    assert packed.tolist() == [0b111111111, 0, 0]
    assert unpack_codes(packed, 3, 3).tolist() == [7, 7, 7]
    assert unpack_codes(packed, 3, 5).tolist() == [7, 7, 7, 0, 0]  # padding reads back as code 0
    with pytest.raises(ValueError):
        unpack_codes(packed, 3, 33)  # more codes than the words hold


@pytest.mark.parametrize("bits", range(1, 9))
def test_out_of_range_codes_raise(bits):
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([0, 2**bits]), bits)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([-1, 0]), bits)  # signed codes without their offset
    off = 2 ** (bits - 1)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([-off - 1]), bits, offset=off)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([2**bits - off]), bits, offset=off)
    pack_codes(torch.tensor([-off, 2**bits - off - 1]), bits, offset=off)  # the ends are fine


def test_bad_widths_raise():
    for bits in (0, -3, 17, 32):
        with pytest.raises(ValueError, match="bits"):
            pack_codes(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="multiple"):
        unpack_codes(torch.zeros(5, dtype=torch.int32), 4, 8)


def test_16_bit_indices_two_per_word_and_widths_outside_are_refused():
    idx = torch.tensor([0xFFFF, 1, 0x1234, 0x8000] + [0] * 28)
    packed = pack_codes(idx, 16)
    assert packed.shape == (16,)
    assert (packed[0].item() & 0xFFFFFFFF) == 0x0001FFFF and (packed[1].item() & 0xFFFFFFFF) == 0x80001234
    assert torch.equal(unpack_codes(packed, 16, 32), idx)
    for bad in (0, 17):
        with pytest.raises(ValueError, match="1 to 16 bits"):
            pack_codes(idx % 2, bad)
        with pytest.raises(ValueError, match="1 to 16 bits"):
            unpack_codes(packed, bad, 4)


def test_packing_in_row_slices_is_the_same_as_at_once(monkeypatch):
    """Large tensors are packed a slice of rows at a time (bounded int64 temporaries): same words."""
    from llmpress.quant import pack

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (300, 70), generator=g)
    whole = pack.pack_codes(codes, 4, offset=8)
    monkeypatch.setattr(pack, "CHUNK_ELEMENTS", 500)  # a few rows per slice
    assert torch.equal(pack.pack_codes(codes, 4, offset=8), whole)
    assert torch.equal(pack.unpack_codes(whole, 4, 70, offset=8), codes)
    three = torch.randint(0, 8, (4, 5, 33), generator=g)
    assert torch.equal(pack.unpack_codes(pack.pack_codes(three, 3), 3, 33), three)
