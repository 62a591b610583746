"""llama.cpp's grids in llmpress: the ``*-q4_0`` presets' sign-aware scale (x_m / -8, negative
scales) through the packed checkpoint, load_compressed and the GGUF export (bit for bit, and
block for block what the gguf package's reference Q4_0 quantizer writes); the ``*-head8``
presets' Q8_0 tied head; refusals of the signed grid where GGUF has no block type."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from conftest import random_windows
from helpers import logits, rel_err
from safetensors.torch import load_file
from test_gguf import _bits, _check_linears, _export_refused, _gguf_weight, _model, _packed, _tensors, _tokenizer

import llmpress
from llmpress import stage
from llmpress.export.gguf import export_gguf
from llmpress.quant import QuantArgs
from llmpress.quant.core import compute_qparams
from llmpress.recipe import load_recipe

Q4_0_PRESETS = ["rtn-q4_0", "gptq-q4_0", "awq-gptq-q4_0"]
# layer-0 linears whose GGUF rows are in Hugging Face order (q / k are permuted for rope)
PLAIN = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down"}


@pytest.mark.parametrize("preset", Q4_0_PRESETS + [p + "-head8" for p in Q4_0_PRESETS] + ["awq-gptq-q4_0-head8-lsq"])
def test_q4_0_presets_quantize_on_the_sign_aware_grid(preset):
    stages = load_recipe(preset).stages
    body = [s for s in stages if "lm_head" not in s.targets]
    assert body and all(s.config.weights.signed_scale and not s.config.weights.full_range for s in body)
    assert all(s.config.weights.group_size == 32 and s.config.weights.scale_dtype == "float16" for s in body)
    heads = [s for s in stages if tuple(s.targets) == ("lm_head",)]
    assert len(heads) == (1 if "-head8" in preset else 0)
    for s in heads:  # Q8_0 as llama.cpp computes it: d = max|x| / 127
        w = s.config.weights
        assert (w.bits, w.group_size, w.symmetric, w.signed_scale, w.full_range, w.scale_dtype) == (8, 32, True, False, False, "float16")


def test_blocks_are_llama_cpp_reference_q4_0(tmp_path):
    """rtn-q4_0's GGUF blocks against the gguf package's Q4_0 quantizer (llama.cpp's reference
    rule) of the same float weights: every fp16 d the same bytes (negative ones included), the
    codes the same but where x / d sits within float rounding of a half step (llmpress divides
    by the float16 d and rounds half to even; the reference multiplies by 1 / d before rounding
    d to float16)."""
    m = _model()
    orig = {k: m.get_submodule(f"model.layers.0.{k}").weight.detach().float().numpy().copy() for k in PLAIN}
    src, _ = _packed(tmp_path, "rtn-q4_0", model=m)
    got = _tensors(export_gguf(src, tmp_path / "m.gguf"))
    negative = 0
    for hf, gg in PLAIN.items():
        ours = np.asarray(got[f"blk.0.{gg}.weight"].data).reshape(-1, 18)
        ref = gguf.quants.quantize(orig[hf], gguf.GGMLQuantizationType.Q4_0).reshape(-1, 18)
        assert np.array_equal(ours[:, :2], ref[:, :2]), hf
        negative += int((ours[:, :2].copy().view(np.float16) < 0).sum())
        same = np.mean(ours[:, 2:] == ref[:, 2:])  # bytes of two codes each
        assert same > 0.998, (hf, same)  # measured: 0.9996 of codes on 262144 Gaussian weights
    assert negative > 0


def test_negative_scales_survive_the_checkpoint_and_serve(tmp_path):
    ids = random_windows(2, 16, vocab=len(_tokenizer()))
    src, m = _packed(tmp_path, "gptq-q4_0")
    want = logits(m, ids)
    stored = load_file(str(next(src.glob("*.safetensors"))))
    scale = stored["model.layers.0.mlp.down_proj.scale"]
    assert scale.dtype == torch.float32 and bool((scale < 0).any()) and bool((scale > 0).any())
    assert torch.equal(scale.half().float(), scale)
    for backend, tol in (("dequant", 1e-6), ("auto", 1e-2)):
        loaded, _ = llmpress.load_compressed(str(src), backend=backend)
        assert rel_err(logits(loaded, ids), want) <= tol, backend
        lin = loaded.get_submodule("model.layers.0.mlp.down_proj")
        ref = m.get_submodule("model.layers.0.mlp.down_proj").weight.detach().float()
        if backend == "dequant" or type(lin).__name__ == "LowbitInt4Linear":  # exact decoders
            assert torch.equal(lin.dequantized_weight(torch.float32), ref), type(lin).__name__
    assert _check_linears(export_gguf(src, tmp_path / "m.gguf"), src) == {"Q4_0"}


@pytest.mark.parametrize("preset", ["rtn-q4_0-head8", "gptq-q4_0-head8", "awq-gptq-q4_0-head8-lsq"])
def test_head8_presets_write_the_tied_head_as_q8_0(tmp_path, preset):
    src, m = _packed(tmp_path, preset)
    out = export_gguf(src, tmp_path / "m.gguf")
    got = _tensors(out)
    emb = got["token_embd.weight"]
    assert "output.weight" not in got and emb.tensor_type.name == "Q8_0"
    loaded, _ = llmpress.load_compressed(str(src), backend="dequant")
    assert np.array_equal(_bits(_gguf_weight(emb)), _bits(loaded.lm_head.dequantized_weight(torch.float32).numpy()))
    assert _check_linears(out, src) == {"Q4_0"}
    # llama.cpp's own Q8_0 of the float embedding: the same scales, the same codes but at half
    # steps; all-zero blocks (the padding token's row) have d = 0 there, the smallest float16 here
    table = _model().model.embed_tokens.weight.detach().numpy()
    ref = gguf.quants.quantize(table, gguf.GGMLQuantizationType.Q8_0).reshape(-1, 34)
    ours = np.asarray(emb.data).reshape(-1, 34)
    live = np.abs(table.reshape(-1, 32)).max(-1) > 0
    assert 0 < live.sum() < len(live) and (ours[~live, 2:] == 0).all()
    assert np.array_equal(ours[live, :2], ref[live, :2]) and np.mean(ours[:, 2:] == ref[:, 2:]) > 0.99
    # an F16 embedding (2 bytes a weight) became 34 bytes per 32 weights
    plain, _ = _packed(tmp_path / "plain", preset.split("-head8")[0])
    size = {p: p.stat().st_size for p in (out, export_gguf(plain, tmp_path / "plain.gguf"))}
    n = emb.n_elements
    assert size[tmp_path / "plain.gguf"] - size[out] == pytest.approx(2 * n - 34 * n // 32, abs=4096)


@pytest.mark.parametrize(
    "weights,words",
    [
        (QuantArgs(bits=4, group_size=64, signed_scale=True, scale_dtype="float16"), ["signed-scale g64", "32 weights", "gptq-q4_0"]),
        (QuantArgs(bits=4, group_size=32, signed_scale=True), ["signed-scale g32)", "not float16 values", "scale_dtype: float16"]),
        (QuantArgs(bits=3, group_size=32, signed_scale=True, scale_dtype="float16"), ["no 3-bit", "gptq-q4_0"]),
    ],
    ids=["g64", "fp32-scales", "int3"],
)
def test_signed_grid_without_a_block_type_is_refused(tmp_path, capsys, restore_logging, weights, words):
    src, _ = _packed(tmp_path, [stage("rtn", weights=weights, ignore=["lm_head"])])
    _export_refused(tmp_path, capsys, src, words)


def test_signed_int8_is_exact_q8_0(tmp_path):
    """8-bit with the sign-aware scale (x_m / -128) is a Q8_0 grid too (d * q, d negative)."""
    w = QuantArgs(bits=8, group_size=32, signed_scale=True, scale_dtype="float16")
    src, _ = _packed(tmp_path, [stage("rtn", weights=w, ignore=["lm_head"])])
    out = export_gguf(src, tmp_path / "m.gguf")
    assert _check_linears(out, src) == {"Q8_0"}
    d = np.asarray(_tensors(out)["blk.0.ffn_down.weight"].data).reshape(-1, 34)[:, :2].copy().view(np.float16)
    assert (d < 0).any() and (d > 0).any()


@pytest.mark.parametrize(
    ("weights", "qtype"),
    [
        (QuantArgs(bits=4, group_size=32, signed_scale=True, scale_dtype="float16", observer="lsq"), "Q4_0"),
        (QuantArgs(bits=4, group_size=32, symmetric=False, scale_dtype="float16", observer="lsq"), "Q4_1"),
    ],
    ids=["q4_0", "q4_1"],
)
def test_lsq_observer_scales_export_exactly(tmp_path, weights, qtype):
    """The lsq observer's refitted scales are still one float16 scale per block of 32 on the
    same grid: the export writes them bit for bit; they are not the min-max rule's."""
    m = _model()
    orig = m.get_submodule("model.layers.0.mlp.down_proj").weight.detach().float().clone()
    src, _ = _packed(tmp_path, [stage("rtn", weights=weights, ignore=["lm_head"])], model=m)
    assert _check_linears(export_gguf(src, tmp_path / "m.gguf"), src) == {qtype}
    stored = load_file(str(next(src.glob("*.safetensors"))))["model.layers.0.mlp.down_proj.scale"]
    rule = compute_qparams(orig, replace(weights, observer="minmax")).scale
    assert stored.shape == rule.shape and torch.equal(stored.half().float(), stored)
    assert bool((stored != rule).any())
