"""Checkpoint compatibility across the storage-form interface: a packed folder written by
llmpress before it (tests/fixtures/packed_forms_v1, made by tests/fixtures/packed_forms.py
with the code of commit ae56f6b) still loads to the same logits, and the current writers
produce the very same bytes (packed and compressed-tensors) and size figures."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OLD = FIXTURES / "packed_forms_v1"
sys.path.insert(0, str(FIXTURES))
import packed_forms  # noqa: E402


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_old_folder_loads_to_the_same_logits(tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "old"
    shutil.copytree(OLD, folder)
    packed_forms.write(tmp_path / "new")  # today's writer, same model and recipe
    got = packed_forms.logits(folder, "dequant")
    assert torch.equal(got, packed_forms.logits(tmp_path / "new", "dequant"))  # bit for bit, same machine
    # the logits stored when the fixture was made: equal up to the float summation order of
    # another CPU's kernels (they were bit for bit on the machine that made them)
    expected = load_file(str(OLD / "expected.safetensors"))["logits"]
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    auto = packed_forms.logits(folder, "auto")  # CPU kernels where they apply (bf16 activations for torch's)
    assert (auto - expected).abs().max() <= 0.02 * expected.abs().max()


def test_old_folder_records_every_form():
    meta = json.loads((OLD / "llmpress.json").read_text())
    kinds = {(d["kind"], d["structure"], bool(d["exceptions"]), d["g_idx"], (d["weights"] or {}).get("kind")) for d in meta["layers"].values()}
    assert {
        ("quant", None, False, False, "ternary"),
        ("quant", None, False, False, "binary"),
        ("quant", None, True, False, "int"),
        ("quant", None, False, True, "int"),
        ("sparse", "2:4", False, False, None),
        ("sparse", "unstructured", False, False, None),
        ("dense", None, False, False, None),
        ("quant", "2:4", False, False, "int"),
    } <= kinds
    assert meta["tied_quant_embeddings"] == {"model.embed_tokens.weight": "lm_head"}  # the int8 head


def test_writer_gives_the_same_bytes(tmp_path):
    packed_forms.write(tmp_path / "new")
    for f in ("model.llmpress.safetensors", "llmpress.json", "config.json"):
        assert _sha(tmp_path / "new" / f) == _sha(OLD / f), f


def test_compressed_tensors_export_gives_the_same_bytes(tmp_path):
    from llmpress.export.compressed_tensors import export_compressed_tensors

    packed_forms.write(tmp_path / "packed", "ct")
    export_compressed_tensors(tmp_path / "packed", tmp_path / "ct")
    want = json.loads((OLD / "ct_hashes.json").read_text())
    got = {f: _sha(tmp_path / "packed" / f) for f in ("model.llmpress.safetensors", "llmpress.json", "config.json")}
    got.update({f"ct/{f}": _sha(tmp_path / "ct" / f) for f in ("model.safetensors", "config.json")})
    assert got == want


def test_size_figures_unchanged():
    assert packed_forms.figures(OLD) == json.loads((OLD / "expected.json").read_text())


@pytest.mark.parametrize("variant", ("all", "ct"))
def test_fixture_model_is_deterministic(variant):
    a, _ = packed_forms.build(variant)
    b, _ = packed_forms.build(variant)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
