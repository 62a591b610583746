"""GGUF Q5_0 / Q5_1, Q6_K, Q3_K, Q4_K and Q5_K: byte layouts against the gguf package's own
dequantizer (random codes, every bit position), llmpress's two-level ``super_block`` grid
(Q6_K's int8 and Q3_K's 6-bit group scales of an fp16 d) in RTN and GPTQ, the export bit for
bit on a tiny Llama with 256-wide rows, and refusals (rows not a multiple of 256, grids near
Q6_K but not it)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import random_windows, tiny_llama
from helpers import QUIET
from test_gguf import _check_linears, _export_refused, _packed, _tensors, _tokenizer

import llmpress
from llmpress import RecipeError, UserError, api, stage
from llmpress.export.gguf import export_gguf
from llmpress.export.gguf_layouts import (
    iq4_nl_blocks,
    iq4_xs_blocks,
    q2_k_blocks,
    q3_k_blocks,
    q4_k_blocks,
    q5_k_blocks,
    q6_k_blocks,
    q6_k_scales,
    small_blocks,
)
from llmpress.export.packed_load import read_manifest
from llmpress.export.packed_size import checkpoint_accounting
from llmpress.quant import QuantArgs, compute_qparams, quantize
from llmpress.quant.core import bits_per_weight, fake_quantize
from llmpress.quant.gptq import GPTQ, gptq_quantize

Q6K = QuantArgs(bits=6, group_size=16, super_block=256, signed_scale=True, scale_dtype="float16")
Q3K = QuantArgs(bits=3, group_size=16, super_block=256, signed_scale=True, scale_dtype="float16", group_scale_bits=6)
T = gguf.GGMLQuantizationType


def _dequant(blocks: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.dequantize(blocks.reshape(blocks.shape[0], -1), qtype)


@pytest.mark.parametrize(("qtype", "lo", "hi", "asym"), [("Q5_0", -16, 15, False), ("Q5_1", 0, 31, True), ("Q4_0", -8, 7, False)])
def test_small_block_layouts_decode_in_gguf(qtype, lo, hi, asym):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(lo, hi + 1, (3, 4, 32), generator=g)
    scale = (torch.rand(3, 4, generator=g) - 0.5).half().float()
    minimum = torch.randn(3, 4, generator=g).half().float() if asym else None
    got = _dequant(small_blocks(qtype, codes, scale, minimum), getattr(T, qtype)).reshape(3, 4, 32)
    want = codes.float() * scale.unsqueeze(-1) + (0 if minimum is None else minimum.unsqueeze(-1))
    assert np.array_equal(got, want.numpy())


def test_q6_k_layout_decodes_in_gguf():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-32, 32, (2, 3, 256), generator=g)
    d = (torch.rand(2, 3, generator=g) - 0.5).half().float()
    sc = torch.randint(-128, 128, (2, 3, 16), generator=g).float()
    got = _dequant(q6_k_blocks(codes, d, sc), T.Q6_K).reshape(2, 3, 16, 16)
    want = (d.unsqueeze(-1) * sc).unsqueeze(-1) * codes.float().reshape(2, 3, 16, 16)
    assert np.array_equal(got, want.numpy())


def test_q3_k_layout_decodes_in_gguf():
    """Every 6-bit scale code at every group position (both nibbles, all four top-bit pairs),
    every code at every bit position: gguf's own Q3_K decoder reads what llmpress wrote."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-4, 4, (4, 4, 256), generator=g)
    d = (torch.rand(4, 4, generator=g) - 0.5).half().float()
    sc = (torch.arange(64).reshape(4, 16) - 32).float()  # [4 blocks x 16 groups]: all of -32..31
    sc = torch.stack([sc.roll(k, 0) for k in range(4)])  # [4 rows, 4 blocks, 16]
    blocks = q3_k_blocks(codes, d, sc)
    assert blocks.shape == (4, 4, 110)
    got = _dequant(blocks, T.Q3_K).reshape(4, 4, 16, 16)
    want = (d.unsqueeze(-1) * sc).unsqueeze(-1) * codes.float().reshape(4, 4, 16, 16)
    assert np.array_equal(got, want.numpy())


def test_iq4_layouts_decode_in_gguf():
    """Every 6-bit block scale code at every block position (IQ4_XS) and every table level at
    every nibble position: gguf's own IQ4_NL / IQ4_XS decoders read what llmpress wrote."""
    from llmpress.quant.iq4 import levels

    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (8, 8, 256), generator=g)
    d = (torch.rand(8, 8, generator=g) - 0.5).half().float()
    sc = (torch.arange(64).reshape(8, 8) - 32).float()  # [8 super-blocks x 8 blocks]: all of -32..31
    sc = torch.stack([sc.roll(k, 0) for k in range(8)])
    got = _dequant(iq4_xs_blocks(codes, d, sc), T.IQ4_XS).reshape(8, 8, 8, 32)
    want = (d.unsqueeze(-1) * sc).unsqueeze(-1) * levels()[codes].reshape(8, 8, 8, 32)
    assert np.array_equal(got, want.numpy())
    dn = (torch.rand(8, 64, generator=g) - 0.5).half().float()
    got = _dequant(iq4_nl_blocks(codes.reshape(8, 64, 32), dn), T.IQ4_NL).reshape(8, 64, 32)
    assert np.array_equal(got, (dn.unsqueeze(-1) * levels()[codes.reshape(8, 64, 32)]).numpy())


def test_q2_k_layout_decodes_in_gguf():
    """Every 4-bit scale and minimum at every group position, every code at every bit pair."""
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 4, (16, 16, 256), generator=g)
    d, dmin = torch.rand(16, 16, generator=g).half().float(), torch.rand(16, 16, generator=g).half().float()
    sc = torch.stack([torch.arange(16).roll(k) for k in range(16)]).float().expand(16, 16, 16)
    m = torch.stack([torch.arange(16).flip(0).roll(k) for k in range(16)]).float().expand(16, 16, 16)
    blocks = q2_k_blocks(codes, d, sc, dmin, m)
    assert blocks.shape == (16, 16, 84)
    got = _dequant(blocks, T.Q2_K).reshape(16, 16, 16, 16)
    want = (d.unsqueeze(-1) * sc).unsqueeze(-1) * codes.float().reshape(16, 16, 16, 16) - (dmin.unsqueeze(-1) * m).unsqueeze(-1)
    assert np.array_equal(got, want.numpy())


def test_q5_k_layout_decodes_in_gguf():
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 32, (8, 8, 256), generator=g)
    d, dmin = torch.rand(8, 8, generator=g).half().float(), torch.rand(8, 8, generator=g).half().float()
    sc = torch.arange(64).reshape(8, 8).roll(5, 0).float().expand(8, 8, 8)
    m = torch.arange(64).flip(0).reshape(8, 8).float().expand(8, 8, 8)
    got = _dequant(q5_k_blocks(codes, d, sc, dmin, m), T.Q5_K).reshape(8, 8, 8, 32)
    want = (d.unsqueeze(-1) * sc).unsqueeze(-1) * codes.float().reshape(8, 8, 8, 32) - (dmin.unsqueeze(-1) * m).unsqueeze(-1)
    assert np.array_equal(got, want.numpy())


def test_q3_k_grid_has_6_bit_group_scales_and_exports(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(8, 512) * 0.02
    qp = compute_qparams(w, Q3K)
    d, sc = q6_k_scales(qp.scale.reshape(8, 2, 16), 6)
    assert float(sc.min()) == -32 and float(sc.max()) <= 31 and bool((sc == -32).any(-1).all())
    codes = quantize(w, qp, Q3K)
    assert int(codes.min()) == -4 and int(codes.max()) <= 3
    assert bits_per_weight(Q3K, 512, 8) == 3.4375  # Q3_K: 110 bytes per 256 weights
    assert Q3K.to_dict()["group_scale_bits"] == 6 and "group_scale_bits" not in Q6K.to_dict()
    src = _wide_packed(tmp_path, Q3K)
    out = export_gguf(src, tmp_path / "m.gguf")
    assert _check_linears(out, src) == {"Q3_K"}
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q3_K_S)
    assert _tensors(out)["blk.0.ffn_down.weight"].data.shape == (256, 2 * 110)


def test_q4_k_layout_decodes_in_gguf():
    """Every 6-bit scale and minimum value at every group position (both packings: groups
    0-3 and 4-7), every nibble position: gguf's own Q4_K decoder reads what llmpress wrote."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (8, 8, 256), generator=g)
    d = torch.rand(8, 8, generator=g).half().float()
    dmin = torch.rand(8, 8, generator=g).half().float()
    sc = torch.arange(64).reshape(8, 8).roll(3, 0).float()  # [8 blocks x 8 groups]: all of 0..63
    m = torch.arange(64).flip(0).reshape(8, 8).float()
    sc, m = sc.expand(8, 8, 8), m.expand(8, 8, 8)
    got = _dequant(q4_k_blocks(codes, d, sc, dmin, m), T.Q4_K).reshape(8, 8, 8, 32)
    want = (d.unsqueeze(-1) * sc).unsqueeze(-1) * codes.float().reshape(8, 8, 8, 32) - (dmin.unsqueeze(-1) * m).unsqueeze(-1)
    assert np.array_equal(got, want.numpy())


def test_super_block_grid_is_q6_k_scales():
    torch.manual_seed(0)
    w = torch.randn(8, 512) * 0.02
    w[0, :256] = 0.0  # an all-zero super-block: codes 0, scales still nonzero
    qp = compute_qparams(w, Q6K)
    ds = q6_k_scales(qp.scale.reshape(8, 2, 16))
    assert ds is not None
    d, sc = ds
    assert torch.equal(d.half().float(), d) and bool((d != 0).all())
    assert float(sc.min()) == -128 and float(sc.max()) <= 127 and bool((sc != 0).all())
    assert bool((sc == -128).any(-1).all())  # each super-block's extreme scale is the code -128
    codes = quantize(w, qp, Q6K)
    assert int(codes.min()) >= -32 and int(codes.max()) <= 31 and not codes[0, :256].any()
    assert bits_per_weight(Q6K, 512, 8) == 6.5625  # Q6_K: 210 bytes per 256 weights
    # two-level scales cost little against one float16 scale per group of 16
    one_level = QuantArgs(bits=6, group_size=16, signed_scale=True, scale_dtype="float16")
    err = {a.describe(): float((fake_quantize(w, a) - w).pow(2).mean()) for a in (Q6K, one_level)}
    assert err[Q6K.describe()] < 1.05 * err[one_level.describe()], err


@pytest.mark.parametrize(
    "fields,fragment",
    [
        ({"super_block": 256, "group_size": 16}, "float16 scales"),
        ({"super_block": 256, "group_size": 16, "scale_dtype": "float16", "symmetric": False}, "symmetric integer groups"),
        ({"super_block": 24, "group_size": 16, "scale_dtype": "float16"}, "multiple"),
        ({"super_block": 16, "group_size": 16, "scale_dtype": "float16"}, "multiple"),
        ({"super_block": True, "group_size": 16, "scale_dtype": "float16"}, "positive number"),
        ({"super_block": 256, "group_size": 16, "scale_dtype": "float16", "group_scale_bits": 9}, "2 to 8 bits"),
        ({"group_size": 16, "scale_dtype": "float16", "group_scale_bits": 6}, "applies to two-level scales"),
    ],
)
def test_bad_super_block_fields(fields, fragment):
    with pytest.raises(RecipeError, match=fragment):
        QuantArgs(**fields)


def test_gptq_on_the_two_level_grid_needs_static_groups():
    torch.manual_seed(0)
    W = torch.randn(16, 512)
    X = torch.randn(1024, 512)
    H = X.t() @ X / 1024
    res = gptq_quantize(W, H, Q6K, act_order=True, static_groups=True)
    assert torch.equal(res.qparams.scale, compute_qparams(W, Q6K).scale)
    assert q6_k_scales(res.qparams.scale.reshape(16, 2, 16)) is not None
    with pytest.raises(RecipeError, match="static_groups: true"):
        GPTQ(weights=Q6K, act_order=False, static_groups=False)
    with pytest.raises(UserError, match="static_groups: true"):
        gptq_quantize(W, H, Q6K, act_order=False, static_groups=False)
    with pytest.raises(UserError, match="super_block 256 does not divide the input dimension 384"):
        gptq_quantize(W[:, :384], H[:384, :384], Q6K)


def _wide_packed(tmp_path, weights):
    m = tiny_llama(hidden=256, inter=512, vocab=len(_tokenizer()))
    rep = api.compress(m, [stage("gptq", weights=weights, ignore=["lm_head"])], data=random_windows(4, 32, vocab=len(_tokenizer())), engine=QUIET)
    return api.save(m, _tokenizer(), tmp_path / "packed", report=rep)


def test_q6_k_export_bit_for_bit(tmp_path):
    src = _wide_packed(tmp_path, Q6K)
    out = export_gguf(src, tmp_path / "m.gguf")
    assert _check_linears(out, src) == {"Q6_K"}
    r = gguf.GGUFReader(out)
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q6_K)
    assert _tensors(out)["blk.0.ffn_down.weight"].data.shape == (256, 2 * 210)
    acc = checkpoint_accounting(read_manifest(src))  # the 16-bit-scale size counts Q6_K's 6.5625 bits per weight
    n = sum(
        m.weight.numel()
        for name, m in tiny_llama(hidden=256, inter=512, vocab=len(_tokenizer())).named_modules()
        if "layers." in name and hasattr(m, "in_features")
    )
    assert acc["theoretical_bytes_16bit_scales"] - acc["other_bytes"] == n * 6.5625 / 8
    loaded, _ = llmpress.load_compressed(str(src), backend="auto")  # serves: no int6 kernel, the exact decode
    want = llmpress.load_compressed(str(src), backend="dequant")[0]
    ids = random_windows(1, 8, vocab=len(_tokenizer()))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want(input_ids=ids).logits)


@pytest.mark.parametrize("preset,qtype", [("rtn-q5_0", "Q5_0"), ("gptq-q5_0", "Q5_0")])
def test_q5_0_presets_export_bit_for_bit(tmp_path, preset, qtype):
    src, _ = _packed(tmp_path, preset)
    out = export_gguf(src, tmp_path / "m.gguf")
    assert _check_linears(out, src) == {qtype}
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q5_0)


def test_q5_1_grid_exports_bit_for_bit(tmp_path):
    w = QuantArgs(bits=5, group_size=32, symmetric=False, scale_dtype="float16")
    src, _ = _packed(tmp_path, [stage("rtn", weights=w, ignore=["lm_head"])])
    assert _check_linears(export_gguf(src, tmp_path / "m.gguf"), src) == {"Q5_1"}


@pytest.mark.parametrize(
    "weights,words",
    [
        (Q6K, ["super_block 256 does not divide the input dimension 64"]),
        (QuantArgs(bits=4, group_size=16, super_block=256, scale_dtype="float16"), ["map to Q6_K", "or Q3_K", "super_block: 256"]),
        (QuantArgs(bits=6, group_size=32, signed_scale=True, scale_dtype="float16"), ["no 6-bit symmetric block type", "gptq-q5_0"]),
    ],
    ids=["narrow-rows", "int4-two-level", "int6-g32"],
)
def test_k_quant_refusals(tmp_path, capsys, restore_logging, weights, words):
    if weights is Q6K:  # the 64-wide tiny model cannot even be compressed on the grid
        with pytest.raises(UserError, match=words[0]):
            _packed(tmp_path, [stage("rtn", weights=weights, ignore=["lm_head"])])
        return
    src = _wide_packed(tmp_path, weights) if weights.super_block else _packed(tmp_path, [stage("rtn", weights=weights, ignore=["lm_head"])])[0]
    _export_refused(tmp_path, capsys, src, words)
