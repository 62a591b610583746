"""Every preset saves in the default packed format and loads back with the same outputs,
run-time part included (online rotations, KV-cache quantizers, activation quantizers,
LLM.int8(), OS+ shifts); hf-fakequant refuses what it cannot hold before any work.

Tolerances. ``backend="dequant"``: the loaded linears decode to the very weights the
compressed model holds (codec.encode_linear checks it bit for bit), rotations are stored
in float64 as the runtime keeps them, and the same operations run in the same order: the
logits are equal up to float32 rounding, asserted as a relative error <= 1e-6 (in practice
0). ``backend="auto"``: W8A8 layers run the integer GEMM, whose float32 result differs
from fake quantization's in the last bits; a later layer's per-token activation rounding
can then flip one int8 code (seen: 7e-4 relative on gemma3 QuaRot W8A8), so <= 1e-2.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama, tiny_tokenizer
from helpers import QUIET, logits, rel_err

import llmpress
from llmpress import api
from llmpress.errors import UserError
from llmpress.export.packed import FORMAT, FORMAT_BLOCK_SIZES, FORMAT_V1, META_FILE
from llmpress.export.packed_load import read_manifest
from llmpress.export.runtime_state import ROTATION_METHODS, RUNTIME_PREFIX, check_save_format
from llmpress.recipe import Recipe, load_recipe, presets
from llmpress.runtime.rotation_state import export_runtime

DEQUANT_TOL = 1e-6
AUTO_TOL = 1e-2
PRESETS = sorted(presets())
RUNTIME_METHODS = ROTATION_METHODS + ("kv_quant",)
RUNTIME_PRESETS = [n for n in PRESETS if any(st.method in RUNTIME_METHODS for st in load_recipe(n).stages)]


@functools.cache
def _tokenizer():
    return tiny_tokenizer()


def _compressed(make, recipe, ids):
    m = make()
    return m, api.compress(m, recipe, data=ids, engine=QUIET)


def _runtime(model) -> dict:
    """export_runtime's description as JSON holds it (tuples become lists)."""
    return json.loads(json.dumps(export_runtime(model)[0], default=repr))


def _act_args(records) -> dict:
    return {n: r.act_args for n, r in records.items() if r.act_args is not None}


def _check_round_trip(m, rep, ids, folder):
    """Save ``m`` packed into ``folder``, load it with both backends, compare."""
    want = logits(m, ids)
    api.save(m, None, folder, report=rep)
    meta = read_manifest(folder)
    desc = _runtime(m)
    for backend, tol in (("dequant", DEQUANT_TOL), ("auto", AUTO_TOL)):
        loaded, _ = llmpress.load_compressed(str(folder), backend=backend)
        assert rel_err(logits(loaded, ids), want) <= tol, backend
        assert _runtime(loaded) == desc  # the same rotations and KV quantizers, re-attached
        assert _act_args(loaded.llmpress_records) == _act_args(rep.result.records)  # activation quantizers (clip_ratio included)
    return meta


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_saves_packed_and_loads_the_same_model(name, tmp_path):
    ids = random_windows(4, 32)
    m, rep = _compressed(tiny_llama, name, ids)
    meta = _check_round_trip(m, rep, ids, tmp_path / "ck")
    extras = [k for k in ("runtime", "llm_int8", "structure") if k in meta]
    per_block = "block_sizes" in (meta.get("structure") or {})
    assert meta["format"] == (FORMAT_BLOCK_SIZES if per_block else FORMAT if extras else FORMAT_V1)  # v1 (older readers) when nothing run-time
    assert ("runtime" in meta) == (name in RUNTIME_PRESETS)  # every rotation / KV preset stores its runtime
    assert ("llm_int8" in meta) == any(st.method == "llm_int8" for st in load_recipe(name).stages)
    # hf-fakequant: refused from the recipe alone exactly when the model holds what it cannot carry
    try:
        check_save_format(load_recipe(name), "hf-fakequant")
        refused = None
    except UserError as e:
        refused = str(e)
    # prune_width allocation: global is refused from the recipe since its blocks may differ; on
    # the tiny model they may come out alike, and then the model itself saves as a HF folder
    alike = not per_block and any(getattr(st.config, "allocation", "uniform") == "global" for st in load_recipe(name).stages)
    assert not alike or "decoder blocks of different sizes" in refused
    if refused and not alike:
        assert "hf-fakequant cannot store" in refused and "packed" in refused
        with pytest.raises(UserError, match="hf-fakequant cannot store"):  # the save-time check agrees
            api.save(m, None, tmp_path / "hf", report=rep, format="hf-fakequant")
        assert not (tmp_path / "hf").exists()
    else:
        api.save(m, _tokenizer(), tmp_path / "hf", report=rep, format="hf-fakequant")
        loaded, _ = llmpress.load_compressed(str(tmp_path / "hf"))
        assert rel_err(logits(loaded, ids), logits(m, ids)) <= DEQUANT_TOL
        assert _runtime(loaded) == _runtime(m)


@pytest.mark.parametrize("name", RUNTIME_PRESETS + ["rtn-w4g64-head8"])
def test_rotation_presets_on_gemma3(name, tmp_path):
    """gemma3: norm-output rotations, scaled (sqrt(hidden)) embeddings; head8 quantizes
    the tied head, so the embedding is rebuilt from the head's codes."""
    ids = random_windows(4, 32)
    m, rep = _compressed(tiny_gemma3, name, ids)
    meta = _check_round_trip(m, rep, ids, tmp_path / "ck")
    if name != "kv4" and name in RUNTIME_PRESETS:
        assert meta["runtime"]["out_rot"]  # gemma3's post-norms: rotations on the norm outputs
    if name == "rtn-w4g64-head8":
        assert meta["tied_quant_embeddings"]


@pytest.mark.parametrize("name", ["kv4", "quarot-w4a4kv4-rtn"])
def test_loaded_kv4_generates_like_the_compressed_model(name, tmp_path):
    """The generation path (a cache filled token by token) of a loaded KV4 checkpoint."""
    ids = random_windows(4, 32)
    m, rep = _compressed(tiny_llama, name, ids)
    api.save(m, None, tmp_path / "ck", report=rep)
    loaded, _ = llmpress.load_compressed(str(tmp_path / "ck"), backend="dequant")
    prompt = ids[:1, :12]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        want = m.generate(prompt, **kw)
        got = loaded.generate(prompt, **kw)
        assert torch.equal(got, want)
        full = loaded(got).logits[:, -1]
        out = loaded(got[:, :-1], use_cache=True)
        step = loaded(input_ids=got[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    assert rel_err(step, full) < 1e-5  # per-token KV codes: the cached step equals the full forward


def test_os_plus_shift_round_trips_and_hf_fakequant_refuses_it(tmp_path):
    d = load_recipe("smoothquant-w8a8").to_dict()
    d["stages"][0]["shift"] = True
    recipe = Recipe.from_dict(d)
    ids = random_windows(4, 32)
    m, rep = _compressed(tiny_llama, recipe, ids)
    meta = _check_round_trip(m, rep, ids, tmp_path / "ck")
    assert meta["format"] == FORMAT and meta["structure"]["norm_shifts"] and meta["structure"]["biases"]
    with pytest.raises(UserError, match="OS\\+ shifts"):
        check_save_format(recipe, "hf-fakequant")
    with pytest.raises(UserError, match="OS\\+ norm shifts"):
        api.save(m, None, tmp_path / "hf", report=rep, format="hf-fakequant")


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """A saved duquant-w4a8 checkpoint (block rotations + permutations: run-time tensors)."""
    ids = random_windows(4, 32)
    m, rep = _compressed(tiny_llama, "duquant-w4a8", ids)
    folder = tmp_path_factory.mktemp("rot") / "ck"
    api.save(m, None, folder, report=rep)
    return folder


def _edit(folder, change):
    p = folder / META_FILE
    meta = json.loads(p.read_text())
    change(meta)
    p.write_text(json.dumps(meta))


def test_runtime_tensors_are_checked_like_the_others(rotated, tmp_path):
    import shutil

    meta = read_manifest(rotated)
    names = [k for k in meta["tensors"] if k.startswith(RUNTIME_PREFIX)]
    assert any(k.endswith(".perm") for k in names) and any(k.endswith(".r1") for k in names)  # DuQuant blocks
    key = names[0]
    for change, msg in [
        (lambda m: m["tensors"][key].update(sha256="0" * 64), "sha256"),
        (lambda m: m["tensors"][key].update(shape=[1]), "the config says"),
        (lambda m: m["runtime"]["rotations"][key[len(RUNTIME_PREFIX) :].split(".")[0]].update(kind="dense"), "run-time tensors"),
        (lambda m: m["runtime"].update(format="llmpress-rotation-runtime-v9"), "newer llmpress"),
    ]:
        folder = tmp_path / "c"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(rotated, folder)
        _edit(folder, change)
        with pytest.raises(UserError, match=msg):
            llmpress.load_compressed(str(folder))


def test_a_newer_format_is_refused_by_name(rotated, tmp_path):
    import shutil

    from llmpress.export.compressed_tensors import export_compressed_tensors

    folder = tmp_path / "c"
    shutil.copytree(rotated, folder)
    _edit(folder, lambda m: m.update(format="llmpress-packed-v5"))
    with pytest.raises(UserError, match="written by a newer llmpress .*llmpress-packed-v5.*reads up to llmpress-packed-v4"):
        llmpress.load_compressed(str(folder))
    with pytest.raises(UserError, match="written by a newer llmpress"):
        export_compressed_tensors(folder, tmp_path / "ct")
    hf = tmp_path / "hf"
    api.save(tiny_llama(), _tokenizer(), hf, format="hf-fakequant")
    _edit(hf, lambda m: m.update(format="llmpress-fakequant-v2"))
    with pytest.raises(UserError, match="written by a newer llmpress"):
        llmpress.load_compressed(str(hf))


def test_v1_checkpoint_without_runtime_still_loads(tmp_path):
    """A v1 manifest as llmpress wrote it before run-time sections existed."""
    ids = random_windows(2, 16)
    m, rep = _compressed(tiny_llama, "rtn-w4g64", ids)
    api.save(m, None, tmp_path / "ck", report=rep)
    meta = read_manifest(tmp_path / "ck")
    assert meta["format"] == FORMAT_V1 and not any(k in meta for k in ("runtime", "llm_int8", "structure"))
    assert not any(k.startswith(RUNTIME_PREFIX) for k in meta["tensors"])
    loaded, _ = llmpress.load_compressed(str(tmp_path / "ck"), backend="dequant")
    assert torch.equal(logits(loaded, ids), logits(m, ids))


def test_hf_fakequant_is_refused_before_the_model_is_loaded(tmp_path):
    """run_pipeline checks the save format against the recipe first: the model spec here
    does not even exist, and the error is about the format."""
    with pytest.raises(UserError, match="hf-fakequant cannot store the online rotations of quarot .*stage 0"):
        api.run_pipeline(str(tmp_path / "no-such-model"), "quarot-w8a8", out=str(tmp_path / "o"), save_format="hf-fakequant", evaluation=None)
    assert list(tmp_path.iterdir()) == []
    check_save_format(load_recipe("quarot-w8a8"), "packed")  # the default format holds it


def test_cli_hf_fakequant_rotation_exits_2_with_one_line(tmp_path, tiny_model_dir, capsys):
    from llmpress.cli import main

    out = tmp_path / "o"
    code = main(["compress", str(tiny_model_dir), "--recipe", "quarot-w4a8", "--format", "hf-fakequant", "--out", str(out), "--no-eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and err[0].startswith("llmpress: error: --format hf-fakequant cannot store the online rotations of quarot")


def test_tensors_no_method_explains_are_refused(tmp_path):
    """Anything a fresh model lacks (or has) that no known method explains: refused, nothing written."""
    ids = random_windows(2, 16)
    m, rep = _compressed(tiny_llama, "rtn-w4g64", ids)
    m.model.layers[0].mlp.register_buffer("stray", torch.ones(3))
    with pytest.raises(UserError, match="no llmpress method explains .*layers.0.mlp.stray"):
        api.save(m, None, tmp_path / "ck", report=rep)
    del m.model.layers[0].mlp.stray
    m.model.layers[1].post_attention_layernorm = torch.nn.Identity()
    with pytest.raises(UserError, match="lacks tensors its architecture has .*layers.1.post_attention_layernorm.weight"):
        api.save(m, None, tmp_path / "ck", report=rep)
    assert list(tmp_path.iterdir()) == []
