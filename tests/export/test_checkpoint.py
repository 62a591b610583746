"""Packed checkpoints: every packing round-trips exactly, the loaded model equals the
fake-quantized one (dequantize fallback), and damaged checkpoints fail with a UserError."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama, tiny_tokenizer
from helpers import QUIET

import llmpress
from llmpress import api, stage
from llmpress.errors import UserError
from llmpress.export import codec
from llmpress.export.packed import FORMAT_V1, META_FILE, WEIGHTS_FILE, checkpoint_accounting
from llmpress.export.packed_load import read_manifest
from llmpress.quant import QuantArgs, pack_codes, quantize_weight, unpack_codes
from llmpress.registry import ModuleRecord
from llmpress.runtime.act_quant import ActQuantLinear
from llmpress.runtime.qlinear import DequantLinear

SCHEMES = [
    QuantArgs(bits=b, symmetric=sym, granularity=gran, group_size=16 if gran == "group" else None)
    for b in (2, 3, 4, 5, 6, 7, 8)
    for sym in (True, False)
    for gran in ("tensor", "channel", "group")
] + [
    QuantArgs(kind="ternary", granularity="channel"),
    QuantArgs(kind="ternary", granularity="group", group_size=16),
    QuantArgs(kind="binary", granularity="channel"),
]


def _weight(out=40, inp=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g)


@pytest.mark.parametrize("bits", (1, 2, 3, 4, 5, 8))
@pytest.mark.parametrize("n", (5, 32, 48, 100))
def test_fast_pack_paths_equal_pack_codes(bits, n):
    u = torch.randint(0, 2**bits, (3, n), generator=torch.Generator().manual_seed(n))
    u[0, 0], u[-1, -1] = 2**bits - 1, 0
    packed = codec.pack_unsigned(u, bits)
    assert torch.equal(packed, pack_codes(u, bits))  # the byte-level path writes the same words
    assert torch.equal(codec.unpack_unsigned(packed, bits, n).long(), u)
    assert torch.equal(unpack_codes(packed, bits, n), u)


@pytest.mark.parametrize("args", SCHEMES, ids=lambda a: a.describe().replace(" ", "-"))
def test_encode_decode_round_trip(args):
    w = _weight()
    wq, qp = quantize_weight(w, args)
    rec = ModuleRecord(name="l", out_features=w.shape[0], in_features=w.shape[1], weight_args=args, qparams=qp)
    spec, t = codec.encode_linear(wq, rec)
    assert spec.kind == "quant" and spec.n_exceptions == 0
    assert {k: tuple(v.shape) for k, v in t.items()} == spec.expected_shapes()
    assert t["qweight"].dtype == torch.int32 and t["scale"].dtype == torch.float32
    # the words hold the codes llmpress.quant.core gives, nothing else
    d = codec.decode_quant(spec, t)
    assert torch.equal(d.codes.long(), codec.codes_of(wq, qp, args).long())
    assert torch.equal(codec.decode_weight(spec, t), wq)  # bit for bit
    back = codec.LinearSpec.from_dict(json.loads(json.dumps(spec.to_dict())), "x")
    assert back == spec


def test_storage_is_bits_per_weight():
    w = _weight(64, 128)
    args = QuantArgs(bits=4, group_size=32)
    wq, qp = quantize_weight(w, args)
    spec, t = codec.encode_linear(wq, ModuleRecord(name="l", out_features=64, in_features=128, weight_args=args, qparams=qp))
    assert t["qweight"].numel() * 32 == 64 * 128 * 4  # 4 bits per weight exactly
    assert t["scale"].shape == (64, 4)


def test_group_index_round_trip():
    w = _weight(16, 64)
    args = QuantArgs(bits=4, group_size=16)
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(1)) % 4  # groups out of column order
    scale = torch.stack([w[:, g_idx == k].abs().amax(1) / 7 for k in range(4)], 1)
    from llmpress.quant.core import QParams

    qp = QParams(scale=scale)
    wq = codec.dequant(codec.codes_of(w, qp, args, g_idx), qp, args, g_idx)
    rec = ModuleRecord(name="l", out_features=16, in_features=64, weight_args=args, qparams=qp, notes={"g_idx": g_idx})
    spec, t = codec.encode_linear(wq, rec)
    assert spec.has_g_idx and torch.equal(t["g_idx"], g_idx.int())
    assert torch.equal(codec.decode_weight(spec, t), wq)


def test_kept_outliers_are_exceptions():
    w = _weight(32, 64)
    args = QuantArgs(bits=3, group_size=32)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[3, 5] = keep[10, 40] = keep[31, 0] = True
    dense, qp = quantize_weight(w.masked_fill(keep, 0), args)
    full = torch.where(keep, w, dense)  # SpQR-style: grid + a few full-precision weights
    spec, t = codec.encode_linear(full, ModuleRecord(name="l", out_features=32, in_features=64, weight_args=args, qparams=qp))
    assert spec.n_exceptions == 3 and t["exc_value"].tolist() == full[keep].tolist()
    assert torch.equal(codec.decode_weight(spec, t), full)
    # a weight moved off its grid everywhere is not stored as "exceptions"
    assert codec.encode_linear(full + 1e-3, ModuleRecord(name="l", out_features=32, in_features=64, weight_args=args, qparams=qp)) is None


def test_sparse_only_and_sparse_quantized():
    w = _weight(16, 64)
    mask = torch.zeros(16, 16, 4, dtype=torch.bool)
    mask[..., :2] = True  # prune 2 of every 4
    ws = w.masked_fill(mask.reshape(16, 64), 0)
    spec, t = codec.encode_linear(ws, ModuleRecord(name="l", out_features=16, in_features=64, sparsity=0.5))
    assert spec.kind == "sparse" and spec.structure == "2:4"
    assert t["values"].numel() == 16 * 32 and t["mask"].shape == (16, 2)
    assert torch.equal(codec.decode_weight(spec, t), ws)
    args = QuantArgs(bits=4, group_size=32)
    wq, qp = quantize_weight(ws, args)
    spec, t = codec.encode_linear(wq, ModuleRecord(name="l", out_features=16, in_features=64, weight_args=args, qparams=qp, sparsity=0.5))
    assert spec.kind == "quant" and spec.structure == "2:4" and set(t) == {"qweight", "scale"}  # zeros are zero codes
    assert torch.equal(codec.decode_weight(spec, t), wq)


def _compressed(model_fn, weights, activations=None, **kw):
    m = model_fn()
    return m, llmpress.compress(m, stage("rtn", weights=weights, activations=activations, **kw), engine=QUIET)


CASES = [
    ("w4g32", QuantArgs(bits=4, group_size=32), None),
    ("w4g32-asym", QuantArgs(bits=4, group_size=32, symmetric=False), None),
    ("w3-channel", QuantArgs(bits=3, granularity="channel"), None),
    ("w3g32-full-range", QuantArgs(bits=3, group_size=32, full_range=True), None),
    ("w8a8", QuantArgs(bits=8, granularity="channel"), QuantArgs(bits=8, granularity="token")),
    ("w4a8", QuantArgs(bits=4, group_size=32), QuantArgs(bits=8, granularity="token")),
    ("ternary", QuantArgs(kind="ternary", granularity="channel"), None),
]


@pytest.mark.parametrize("name,weights,acts", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_save_load_equals_fake_quant(tmp_path, name, weights, acts, family):
    m, rep = _compressed(tiny_llama if family == "llama" else tiny_gemma3, weights, acts)
    ids = random_windows(2, 24)
    with torch.no_grad():
        ref = m(ids).logits
    out = api.save(m, tiny_tokenizer(), tmp_path / "ck", report=rep)
    meta = read_manifest(out)
    assert meta["format"] == FORMAT_V1 and len(meta["layers"]) == 14 and not meta["dense_layers"]
    loaded, tok = llmpress.load_compressed(str(out), backend="dequant")
    assert tok is not None and isinstance(loaded.llmpress_records, dict) and len(loaded.llmpress_records) == 14
    lin = [mod for mod in loaded.modules() if isinstance(mod, DequantLinear)]
    assert len(lin) == 14
    assert sum(isinstance(mod, ActQuantLinear) for mod in loaded.modules()) == (14 if acts else 0)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, ref)  # the dequantize fallback is exact
    # the records come back (scheme and scales)
    r0 = rep.result.records["model.layers.0.self_attn.q_proj"]
    r1 = loaded.llmpress_records["model.layers.0.self_attn.q_proj"]
    assert r1.weight_args == r0.weight_args and r1.act_args == r0.act_args and torch.equal(r1.qparams.scale, r0.qparams.scale)


def test_tied_embeddings_and_sizes(tmp_path):
    m, rep = _compressed(tiny_llama, QuantArgs(bits=4, group_size=32), ignore=["lm_head"])
    out = api.save(m, None, tmp_path / "ck", report=rep)
    meta = read_manifest(out)
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded, _ = llmpress.load_compressed(str(out))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    acc = checkpoint_accounting(meta)
    # theory: 4 bits per quantized weight + a float32 scale per 32, the rest as stored
    lin = sum(r.n_params for r in rep.result.records.values())
    other = sum(p.numel() * 4 for n, p in m.named_parameters() if not any(n.startswith(k + ".weight") for k in rep.result.records))
    assert acc["theoretical_bytes"] == lin * 4 / 8 + lin / 32 * 4 + other
    assert acc["tensor_bytes"] == acc["theoretical_bytes"]
    assert 0 < acc["file_bytes"] - acc["tensor_bytes"] < 16_000  # the safetensors header
    size = api.evaluate.__globals__["model_size"](m, rep.result.records)
    from llmpress.export.packed import packed_model_size

    assert packed_model_size(loaded)["size_mb"] == pytest.approx(size["size_mb"])
    assert packed_model_size(loaded)["n_params"] == size["n_params"]


@pytest.mark.parametrize("backend", ["dequant", "auto", "torch"])
def test_quantized_tied_head_rebuilds_the_embedding(tmp_path, backend):
    """W4 blocks + int8 head tied to the embedding: the embedding is stored once, as the
    head's codes, and looked up from them; outputs equal the fake-quantized model's."""
    m = tiny_llama()
    recipe = [
        stage("rtn", weights=QuantArgs(bits=4, group_size=32)),
        stage("rtn", targets=["lm_head"], ignore=[], weights=QuantArgs(bits=8, granularity="channel")),
    ]
    rep = llmpress.compress(m, recipe, engine=QUIET)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied and quantized together
    ids = random_windows(2, 24)
    with torch.no_grad():
        ref, emb_ref = m(ids).logits, m.model.embed_tokens(ids)
    out = api.save(m, None, tmp_path / "ck", report=rep)
    meta = read_manifest(out)
    assert meta["tied_quant_embeddings"] == {"model.embed_tokens.weight": "lm_head"}
    assert "model.embed_tokens.weight" not in meta["tensors"] and meta["layers"]["lm_head"]["kind"] == "quant"
    loaded, _ = llmpress.load_compressed(str(out), backend=backend)
    assert loaded.model.embed_tokens.row_scales is not None  # rows gathered from the int8 codes
    with torch.no_grad():
        got, emb = loaded(ids).logits, loaded.model.embed_tokens(ids)
    assert torch.equal(emb, emb_ref)  # int8 rows x their scales: exact
    tol = {"dequant": 0.0, "auto": 1e-5, "torch": 5e-2}[backend]  # torch's kernels: bf16 activations
    assert float((got - ref).abs().max() / ref.abs().max()) <= tol
    # one copy of the table: the int8 codes (1 byte per entry) instead of float32 (4)
    V, D = m.lm_head.weight.shape
    m2, rep2 = _compressed(tiny_llama, QuantArgs(bits=4, group_size=32), ignore=["lm_head"])
    plain = api.save(m2, None, tmp_path / "plain", report=rep2)
    assert read_manifest(plain)["file_bytes"] - meta["file_bytes"] == pytest.approx(V * D * 3 - V * 4, abs=4096)


@pytest.mark.parametrize(
    "head", [QuantArgs(bits=8, granularity="channel", symmetric=False), QuantArgs(bits=4, group_size=32)], ids=["int8-asym-channel", "int4-g32"]
)
def test_quantized_tied_head_other_schemes(tmp_path, head):
    """Heads without symmetric per-row scales: the embedding is dequantized whole, still exact."""
    m = tiny_llama()
    rep = llmpress.compress(
        m, [stage("rtn", weights=QuantArgs(bits=4, group_size=32)), stage("rtn", targets=["lm_head"], ignore=[], weights=head)], engine=QUIET
    )
    ids = random_windows(2, 24)
    with torch.no_grad():
        emb_ref = m.model.embed_tokens(ids)
    loaded, _ = llmpress.load_compressed(str(api.save(m, None, tmp_path / "ck", report=rep)), backend="dequant")
    assert loaded.model.embed_tokens.row_scales is None
    with torch.no_grad():
        assert torch.equal(loaded.model.embed_tokens(ids), emb_ref)


def test_hf_fakequant_format_still_available(tmp_path):
    m, rep = _compressed(tiny_llama, QuantArgs(bits=4, group_size=32), QuantArgs(bits=8, granularity="token"))
    out = api.save(m, tiny_tokenizer(), tmp_path / "hf", report=rep, format="hf-fakequant")
    assert (out / "model.safetensors").exists() and read_manifest(out)["format"] == "llmpress-fakequant-v1"
    ids = random_windows(1, 16)
    loaded, _ = llmpress.load_compressed(str(out))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, m(ids).logits)
    with pytest.raises(UserError, match="save format"):
        api.save(m, None, tmp_path / "x", format="gguf")


@pytest.fixture
def saved(tmp_path):
    m, rep = _compressed(tiny_llama, QuantArgs(bits=4, group_size=32))
    return api.save(m, tiny_tokenizer(), tmp_path / "ck", report=rep)


def test_truncated_checkpoint(saved):
    f = saved / WEIGHTS_FILE
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        llmpress.load_compressed(str(saved))


def test_tampered_tensor(saved):
    f = saved / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x10  # one bit of one packed word
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        llmpress.load_compressed(str(saved))


def test_config_edits_are_caught(saved):
    meta_path = saved / META_FILE
    meta = json.loads(meta_path.read_text())
    bad = json.loads(json.dumps(meta))
    bad["layers"]["model.layers.0.mlp.up_proj"]["weights"]["bits"] = 3  # scheme no longer fits the words
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="qweight has shape"):
        llmpress.load_compressed(str(saved))
    bad = json.loads(json.dumps(meta))
    bad["layers"]["model.layers.0.mlp.up_proj"]["shape"] = [128, 32]
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="up_proj"):
        llmpress.load_compressed(str(saved))
    bad = json.loads(json.dumps(meta))
    del bad["tensors"]["model.norm.weight"]
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="not in the config"):
        llmpress.load_compressed(str(saved))
    meta_path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        llmpress.load_compressed(str(saved))


def test_missing_weights_file(saved):
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(UserError, match="missing"):
        llmpress.load_compressed(str(saved))


def test_plain_transformers_refuses_packed_folder(saved):
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):  # never a model with random weights
        AutoModelForCausalLM.from_pretrained(saved)


def test_cli_compress_writes_packed_and_eval_reads_it(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    from llmpress.cli import main

    out = tmp_path / "w4"
    args = [
        "compress",
        str(tiny_model_dir),
        "--recipe",
        "rtn-w4g64",
        "--out",
        str(out),
        "--eval-data",
        str(tiny_text_file),
        "--eval-windows",
        "2",
        "--seqlen",
        "32",
        "--no-progress",
    ]
    assert main(args) == 0
    assert read_manifest(out)["format"] == FORMAT_V1  # no run-time part: readable by older llmpress
    rep = json.loads((out / META_FILE).read_text())["report"]
    capsys.readouterr()
    assert main(["eval", str(out), "--eval-data", str(tiny_text_file), "--eval-windows", "2", "--seqlen", "32", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ppl"] == pytest.approx(rep["compressed"]["ppl"], rel=2e-3)  # int4 kernel: bf16 activations
    assert got["bits_per_weight"] == rep["compressed"]["bits_per_weight"] == 4.25
    assert got["size_mb"] == pytest.approx(rep["compressed"]["size_mb"])
    assert main(args[:-1] + ["--format", "hf-fakequant", "--out", str(tmp_path / "hf"), "--no-eval"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_online_runtime_modules_are_refused(tmp_path):
    m, rep = _compressed(tiny_llama, QuantArgs(bits=4, group_size=32))
    m.model.layers[0].mlp.llmpress_down_in = torch.nn.Identity()  # not an online rotation llmpress knows
    with pytest.raises(UserError, match="run-time modules llmpress cannot save .*layers.0.mlp.llmpress_down_in"):
        api.save(m, None, tmp_path / "ck", report=rep)
    assert not (tmp_path / "ck").exists() and list(tmp_path.iterdir()) == []
