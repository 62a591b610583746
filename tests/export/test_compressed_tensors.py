"""Export to compressed-tensors: transformers loads it and reproduces llmpress's logits, and the
tensors are bit for bit what compressed-tensors' own compressors write."""

from __future__ import annotations

import json
import re

import compressed_tensors  # noqa: F401  (a pinned dev dependency: a missing one is a failure, not a skip)
import pytest
import torch
from conftest import random_windows, tiny_llama, tiny_tokenizer
from helpers import QUIET

import llmpress
from llmpress import api, stage
from llmpress.calib.plan import CompressResult
from llmpress.errors import UserError
from llmpress.export.compressed_tensors import export_compressed_tensors
from llmpress.quant import QuantArgs
from llmpress.quant.core import quantize
from llmpress.registry import ModuleRecord
from llmpress.report import Report

A8 = QuantArgs(bits=8, granularity="token")


def _compressed(weights, acts=None, prune24=False):
    m = tiny_llama()
    if prune24:
        with torch.no_grad():
            for n, mod in m.named_modules():
                if isinstance(mod, torch.nn.Linear) and n != "lm_head":
                    w = mod.weight.view(mod.out_features, -1, 4)
                    drop = w.abs().argsort(-1)[..., :2]  # the 2 smallest of every 4
                    w.scatter_(-1, drop, 0.0)
    if weights is None:  # sparse only
        return m, _report(
            {
                n: ModuleRecord(name=n, out_features=mod.out_features, in_features=mod.in_features, methods=["prune"], sparsity=0.5)
                for n, mod in m.named_modules()
                if isinstance(mod, torch.nn.Linear) and n != "lm_head"
            }
        )
    rep = llmpress.compress(m, stage("rtn", weights=weights, activations=acts, ignore=["lm_head"]), engine=QUIET)
    if prune24:
        for r in rep.result.records.values():
            r.sparsity = 0.5
    return m, rep


def _report(records):
    """A report carrying hand-made records (what compress() would return)."""
    return Report(model="tiny", recipe={}, result=CompressResult(records=records))


def _export(tmp_path, m, rep, dtype="auto"):
    src = api.save(m, tiny_tokenizer(), tmp_path / "packed", report=rep)
    return src, export_compressed_tensors(src, tmp_path / "ct", dtype=dtype)


def _hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


WEIGHT_ONLY = [
    ("w4a16-g32", QuantArgs(bits=4, group_size=32)),
    ("w4a16-g64", QuantArgs(bits=4, group_size=64)),
    ("w4a16-channel", QuantArgs(bits=4, granularity="channel")),
    ("w8a16-channel", QuantArgs(bits=8, granularity="channel")),
    ("w8a16-g32", QuantArgs(bits=8, group_size=32)),
    ("w3a16-g32", QuantArgs(bits=3, group_size=32)),
    ("w4a16-g32-full-range", QuantArgs(bits=4, group_size=32, full_range=True)),
]


@pytest.mark.parametrize("name,weights", WEIGHT_ONLY, ids=[w[0] for w in WEIGHT_ONLY])
def test_transformers_loads_export_with_llmpress_logits(tmp_path, name, weights):
    m, rep = _compressed(weights)
    src, out = _export(tmp_path, m, rep)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["ignore"] == ["lm_head"] and list(cfg["config_groups"]) == ["group_0"]
    assert cfg["config_groups"]["group_0"]["targets"] == ["Linear"]
    hf = _hf(out)
    assert hf.model.layers[0].mlp.up_proj.weight_packed.dtype == torch.int32
    ids = random_windows(2, 24)
    with torch.no_grad():
        ref = m(ids).logits
        ours, _ = llmpress.load_compressed(str(src), backend="dequant")
        assert torch.equal(ours(ids).logits, ref)
        got = hf(ids).logits
    # compressed-tensors decompresses to the very same weights: only float summation order differs
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    w_hf = hf.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(w_hf, m.model.layers[1].self_attn.o_proj.weight)


def test_w8a8_int_quantized(tmp_path):
    m, rep = _compressed(QuantArgs(bits=8, granularity="channel"), A8)
    _, out = _export(tmp_path, m, rep)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized"
    g = cfg["config_groups"]["group_0"]
    assert g["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    hf = _hf(out)
    ids = random_windows(2, 24)
    with torch.no_grad():
        ref, got = m(ids).logits, hf(ids).logits
    # weights identical; compressed-tensors scales activations by absmax / 127.5 (llmpress, vLLM: / 127)
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight, m.model.layers[1].mlp.down_proj.linear.weight)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize(
    "weights",
    [
        QuantArgs(bits=4, group_size=32),
        QuantArgs(bits=4, group_size=32, symmetric=False),
        QuantArgs(bits=4, granularity="channel", symmetric=False),
        QuantArgs(bits=3, group_size=32, symmetric=False),
        QuantArgs(bits=8, granularity="channel"),
        QuantArgs(bits=8, granularity="channel", symmetric=False),
    ],
    ids=lambda a: a.describe().replace(" ", "-"),
)
def test_tensors_equal_compressed_tensors_compressor(tmp_path, weights):
    """What compressed-tensors' PackedQuantizationCompressor writes for the same weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    m, rep = _compressed(weights)
    _, out = _export(tmp_path, m, rep)
    scheme_json = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme.model_validate(scheme_json)
    t = load_file(str(out / "model.safetensors"))
    half = 1 << (weights.bits - 1)
    for name, rec in rep.result.records.items():
        w = m.get_submodule(name).weight.detach()
        sd = {"weight": w, "weight_scale": rec.qparams.scale.clone()}
        if not weights.symmetric:  # compressed-tensors counts zero points in [-2^(b-1), 2^(b-1))
            sd["weight_zero_point"] = (rec.qparams.zero_point - half).to(torch.int8)
        theirs = PackedQuantizationCompressor.compress(sd, scheme)
        for k in ("weight_packed", "weight_scale", "weight_shape") + (() if weights.symmetric else ("weight_zero_point",)):
            assert torch.equal(t[f"{name}.{k}"], theirs[k]), (name, k)
        assert not any(k.startswith(name + ".") and k.rsplit(".", 1)[1] not in theirs for k in t)


def test_two_four_sparse_exports(tmp_path):
    m, rep = _compressed(QuantArgs(bits=4, group_size=32), prune24=True)
    _, out = _export(tmp_path, m, rep)
    meta = json.loads((out / "llmpress.json").read_text())
    assert meta["sparsity"]["model.layers.0.mlp.up_proj"] == {"structure": "2:4", "sparsity": 0.5}
    hf = _hf(out)
    ids = random_windows(1, 16)
    with torch.no_grad():  # (compressed-tensors decompresses the weights on the first forward)
        assert (hf(ids).logits - m(ids).logits).abs().max() <= 1e-5 * m(ids).logits.abs().max()
    w = hf.model.layers[0].mlp.up_proj.weight
    assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_sparse_only_layers_export_dense(tmp_path):
    m, _ = _compressed(None, prune24=True)  # every linear 2:4-pruned
    rep = llmpress.compress(m, stage("rtn", weights=QuantArgs(bits=4, group_size=32), targets=["re:.*up_proj$"]), engine=QUIET)
    recs = rep.result.records  # up_proj quantized (pruned too) ...
    for n, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and n != "lm_head":
            recs.setdefault(
                n, ModuleRecord(name=n, out_features=mod.out_features, in_features=mod.in_features, methods=["prune"])
            ).sparsity = 0.5  # ... the rest pruned only
    src, out = _export(tmp_path, m, rep)
    packed = json.loads((src / "llmpress.json").read_text())["layers"]
    assert packed["model.layers.0.mlp.down_proj"]["kind"] == "sparse" and packed["model.layers.0.mlp.up_proj"]["kind"] == "quant"
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert "model.layers.0.mlp.down_proj" in cfg["ignore"] and "model.layers.0.mlp.up_proj" not in cfg["ignore"]
    hf = _hf(out)
    ids = random_windows(1, 16)
    with torch.no_grad():
        ref = m(ids).logits
        assert (hf(ids).logits - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight, m.model.layers[1].mlp.down_proj.weight)


def test_mixed_schemes_get_one_group_each(tmp_path):
    m = tiny_llama()
    rep = llmpress.compress(
        m,
        [
            stage("rtn", weights=QuantArgs(bits=4, group_size=32), targets=["re:.*mlp.*"]),
            stage("rtn", weights=QuantArgs(bits=8, granularity="channel"), targets=["re:.*self_attn.*"]),
        ],
        engine=QUIET,
    )
    _, out = _export(tmp_path, m, rep)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(cfg["config_groups"]) == 2 and cfg["ignore"] == ["lm_head"]
    targets = sorted(t for g in cfg["config_groups"].values() for t in g["targets"])
    assert targets == sorted(rep.result.records)
    hf = _hf(out)
    ids = random_windows(1, 16)
    with torch.no_grad():
        ref = m(ids).logits
        assert (hf(ids).logits - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_quantized_tied_head_exports_untied(tmp_path):
    """W4 blocks + int8 head tied to the embedding (rtn-w4g64-head8's layout): the export
    writes the embedding dense, unties it, and transformers reproduces the logits."""
    m = tiny_llama()
    rep = llmpress.compress(
        m,
        [
            stage("rtn", weights=QuantArgs(bits=4, group_size=32)),
            stage("rtn", targets=["lm_head"], ignore=[], weights=QuantArgs(bits=8, granularity="channel")),
        ],
        engine=QUIET,
    )
    _, out = _export(tmp_path, m, rep)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and "lm_head" not in cfg["quantization_config"]["ignore"]
    hf = _hf(out)
    assert torch.equal(hf.model.embed_tokens.weight, m.model.embed_tokens.weight)
    ids = random_windows(1, 16)
    with torch.no_grad():
        ref = m(ids).logits
        assert (hf(ids).logits - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bfloat16_export(tmp_path):
    m, rep = _compressed(QuantArgs(bits=4, group_size=32))
    _, out = _export(tmp_path, m, rep, "bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = _hf(out, torch.bfloat16)
    assert hf.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.bfloat16
    ids = random_windows(1, 16)
    with torch.no_grad():
        ref = m(ids).logits
        got = hf(ids).logits.float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_unrepresentable_schemes_are_refused(tmp_path):
    m, rep = _compressed(QuantArgs(kind="ternary", granularity="channel"))
    src = api.save(m, None, tmp_path / "t", report=rep)
    with pytest.raises(UserError, match="ternary weights cannot be stored"):
        export_compressed_tensors(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="not a packed llmpress checkpoint"):
        export_compressed_tensors(tmp_path, tmp_path / "out")
    # clipped dynamic activations: vLLM would quantize them over the plain range
    m, rep = _compressed(QuantArgs(bits=8, granularity="channel"), QuantArgs(bits=8, granularity="token", clip_ratio=0.9))
    src = api.save(m, None, tmp_path / "clip", report=rep)
    with pytest.raises(UserError, match="clip0.9"):
        export_compressed_tensors(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "preset, what",
    [
        ("quarot-w4a8", "online rotations (q/k per head x2, o_proj input x2, down_proj input x2, norm output x4)"),
        ("kv4", "KV-cache quantizers (2 attention modules)"),
        ("llm-int8", "LLM.int8() decomposition (14 linears)"),
    ],
)
def test_run_time_parts_are_refused_naming_them(tmp_path, capsys, preset, what):
    """compressed-tensors loaders would run the model without its rotations / KV
    quantizers / LLM.int8() columns: refused in one line, nothing written."""
    from llmpress.cli import main

    m = tiny_llama()
    rep = llmpress.compress(m, preset, data=random_windows(2, 16), engine=QUIET)
    src = api.save(m, None, tmp_path / "packed", report=rep)
    with pytest.raises(UserError, match=f"{re.escape(what)} cannot be stored in compressed-tensors"):
        export_compressed_tensors(src, tmp_path / "ct")
    assert main(["export", str(src), "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0] and err[0].startswith("llmpress: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]


def test_cli_export(tmp_path, capsys):
    from llmpress.cli import main

    m, rep = _compressed(QuantArgs(bits=4, group_size=32))
    src = api.save(m, tiny_tokenizer(), tmp_path / "packed", report=rep)
    out = tmp_path / "ct"
    assert main(["export", str(src), "--format", "compressed-tensors", "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert main(["export", str(src), "--out", str(out)]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(src), "--out", str(out), "--overwrite", "--dtype", "float16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "packed"]  # no temporary left behind


def test_codes_match_llmpress_quantize():
    """Sanity of the shared convention: llmpress asym codes minus 2^(b-1) are compressed-tensors codes."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

    from llmpress.quant import quantize_weight

    w = torch.randn(16, 64)
    a = QuantArgs(bits=4, group_size=32, symmetric=False)
    wq, qp = quantize_weight(w, a)
    ours = quantize(wq, qp, a) - 8
    theirs = ct_quantize(
        wq,
        qp.scale,
        (qp.zero_point - 8).to(torch.int8),
        QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32),
        dtype=torch.int8,
    )
    assert torch.equal(ours.to(torch.int8), theirs)


@pytest.mark.slow
def test_smollm2_w4g64_checkpoint_and_export(tmp_path):
    """SmolLM2-135M, RTN W4 g64: checkpoint size near theory, exact reload, transformers loads the export."""
    from llmpress.export.packed import checkpoint_accounting
    from llmpress.export.packed_load import read_manifest

    m, tok = llmpress.load("smollm2-135m")
    rep = llmpress.compress(m, "rtn-w4g64", engine=QUIET)
    src = api.save(m, tok, tmp_path / "w4", report=rep)
    acc = checkpoint_accounting(read_manifest(src))
    assert abs(acc["file_bytes"] / acc["theoretical_bytes"] - 1) < 0.01
    assert abs(acc["file_bytes"] / acc["theoretical_bytes_16bit_scales"] - 1) < 0.10
    ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = m(ids).logits
        ours, _ = llmpress.load_compressed(str(src), backend="dequant")
        assert torch.equal(ours(ids).logits, ref)
        del ours
        out = export_compressed_tensors(src, tmp_path / "ct")
        got = _hf(out)(ids).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
