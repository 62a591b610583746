"""Bad input through the CLI and the API: exit code 2, one clear line, nothing left on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from helpers import cli_fails, listing, weights_copy

import llmpress
from llmpress import CalibConfig, EvalConfig, compress, stage
from llmpress.api import evaluation_windows, run_pipeline
from llmpress.cli import main
from llmpress.errors import RecipeError, UnsupportedArchitecture, UserError
from llmpress.eval.perplexity import perplexity
from llmpress.quant import QuantArgs
from llmpress.recipe import Recipe, load_recipe, presets
from llmpress.registry import METHODS, register
from llmpress.runtime.act_quant import ActQuantLinear

NEEDS_DATA = "_test_cli_needs_data"


@dataclass(frozen=True)
class _NoCfg:
    pass


if NEEDS_DATA not in METHODS:
    register(NEEDS_DATA, _NoCfg, needs=("hessian",), summary="test: gathers statistics, changes nothing")(lambda ctx, cfg: None)


pytestmark = pytest.mark.usefixtures("restore_logging", "private_cache")


def _fast(model_dir, text, out, *extra):
    return [
        "compress", str(model_dir), "--out", str(out), "--json", str(out.parent / "report.json"),
        "--eval-data", str(text), "--seqlen", "32", "--calib-seqlen", "32",
        "--eval-windows", "2", "--calib-samples", "4", "--no-progress", *extra,
    ]  # fmt: skip


# ----------------------------------------------------------------------------- model paths


def test_missing_model_path(tmp_path, outs, tiny_text_file, capsys):
    missing = tmp_path / "no-such-model"
    cli_fails(capsys, _fast(missing, tiny_text_file, outs / "result", "--recipe", "rtn-w8"), str(missing), "not found")
    assert listing(outs) == []
    with pytest.raises(UserError, match="not found"):
        llmpress.load(str(missing))
    with pytest.raises(UserError, match="not found"):
        run_pipeline(str(missing), "rtn-w8", out=str(outs / "result"))
    assert listing(outs) == []


def test_folder_without_config(tmp_path, outs, tiny_text_file, capsys):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README").write_text("hello")
    cli_fails(capsys, _fast(folder, tiny_text_file, outs / "result", "--recipe", "rtn-w8"), str(folder), "config.json")
    assert listing(outs) == []
    with pytest.raises(UserError, match="config.json"):
        llmpress.load(str(folder))
    # a file instead of a folder
    cli_fails(capsys, _fast(folder / "README", tiny_text_file, outs / "result", "--recipe", "rtn-w8"), "is a file")
    assert listing(outs) == []


def test_unsupported_architecture(tmp_path, outs, tiny_text_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2)).eval()
    d = tmp_path / "tiny-gpt2"
    gpt2.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    msg = cli_fails(capsys, _fast(d, tiny_text_file, outs / "result", "--recipe", "rtn-w8"), "unsupported architecture", "'gpt2'", "llama")
    assert "gemma3" in msg
    assert listing(outs) == []
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        compress(gpt2, [stage("rtn", weights=QuantArgs(bits=8, granularity="channel"))])
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        run_pipeline(str(d), "rtn-w8", out=str(outs / "result"), evaluation=None)
    assert listing(outs) == []


# --------------------------------------------------------------------------------- recipes


def _recipe_file(tmp_path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_malformed_recipe_yaml(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys):
    bad = "name: broken\nstages:\n  - method: rtn\n    weights: {bits: 4, group_size: 64\n"
    p = _recipe_file(tmp_path, bad)
    msg = cli_fails(capsys, _fast(tiny_model_dir, tiny_text_file, outs / "result", "--recipe", str(p)), "malformed YAML", "line ", "column ")
    assert str(p) in msg
    assert listing(outs) == []
    with pytest.raises(RecipeError, match=r"line \d+, column \d+"):
        Recipe.from_yaml(bad)
    # the position is the one YAML reports: the flow mapping opened on line 4 never closes
    with pytest.raises(RecipeError, match=r"line 5, column 1"):
        load_recipe(str(p))


def test_unknown_method(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys):
    p = _recipe_file(tmp_path, "stages:\n  - method: gtpq\n    weights: {bits: 4}\n")
    msg = cli_fails(
        capsys, _fast(tiny_model_dir, tiny_text_file, outs / "result", "--recipe", str(p)), "'gtpq'", "known methods", "rtn", "stages[0].method"
    )
    known = msg.split("known methods: ", 1)[1].split(", ")
    assert "rtn" in known and known == sorted(known)
    assert listing(outs) == []
    with pytest.raises(RecipeError, match="known methods: .*rtn"):
        stage("gtpq")


def test_unknown_field_in_stage(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys):
    p = _recipe_file(tmp_path, "stages:\n  - method: rtn\n    wieghts: {bits: 4}\n")
    cli_fails(capsys, _fast(tiny_model_dir, tiny_text_file, outs / "result", "--recipe", str(p)), "wieghts", "stages[0]", "unknown field")
    assert listing(outs) == []
    # a bad field inside the quantization arguments is named with its path
    p = _recipe_file(tmp_path, "stages:\n  - method: rtn\n    weights: {bits: 4, group: 64}\n")
    cli_fails(capsys, _fast(tiny_model_dir, tiny_text_file, outs / "result", "--recipe", str(p)), "stages[0].weights", "group")
    p = _recipe_file(tmp_path, "stages:\n  - method: rtn\n    weights: {bits: 12}\n")
    cli_fails(capsys, _fast(tiny_model_dir, tiny_text_file, outs / "result", "--recipe", str(p)), "stages[0].weights", "bits=12")
    assert listing(outs) == []
    with pytest.raises(RecipeError, match="wieghts"):
        Recipe.from_dict({"stages": [{"method": "rtn", "wieghts": {"bits": 4}}]})


def test_unknown_preset(outs, tiny_model_dir, tiny_text_file, capsys):
    cli_fails(capsys, _fast(tiny_model_dir, tiny_text_file, outs / "result", "--recipe", "rtn-w5"), "'rtn-w5'", "rtn-w8")
    assert listing(outs) == []


def test_group_size_not_dividing(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys):
    # layers.0 divides by 32, so a solver going layer by layer would already have touched
    # it before reaching layers.1.self_attn.q_proj (64 inputs, group 128)
    rec = (
        "stages:\n"
        "  - method: rtn\n    weights: {bits: 4, group_size: 32}\n"
        "  - method: rtn\n    targets: ['re:model\\.layers\\.1\\.self_attn\\.q_proj']\n    weights: {bits: 4, group_size: 128}\n"
    )
    p = _recipe_file(tmp_path, rec)
    cli_fails(capsys, _fast(tiny_model_dir, tiny_text_file, outs / "result", "--recipe", str(p)), "model.layers.1.self_attn.q_proj", "128", "64")
    assert listing(outs) == []

    model = tiny_llama()
    before = weights_copy(model)
    with pytest.raises(UserError) as ei:
        compress(model, str(p))
    assert "model.layers.1.self_attn.q_proj" in str(ei.value) and "128" in str(ei.value) and "64" in str(ei.value)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # validated before touching weights
    assert not any(isinstance(m, ActQuantLinear) for m in model.modules())
    # also when the stage needs calibration data: nothing runs
    before = weights_copy(model)
    with pytest.raises(UserError, match="model.layers.0.self_attn.q_proj"):
        compress(model, [stage(NEEDS_DATA), stage("rtn", weights=QuantArgs(bits=4, group_size=48))], torch.randint(3, 256, (2, 16)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_stage_matching_no_linear(outs, tiny_model_dir, tiny_text_file):
    model = tiny_llama()
    with pytest.raises(UserError, match="matches no linear"):
        compress(model, [stage("rtn", targets=["re:.*nonexistent"])])


# ------------------------------------------------------------------------------ text files


def test_empty_calibration_file(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    argv = _fast(tiny_model_dir, tiny_text_file, outs / "result", "--recipe", "rtn-w8", "--calib-data", str(empty))
    cli_fails(capsys, argv, str(empty), "empty")  # unused by RTN, still an error (not the unused-data warning)
    assert listing(outs) == []
    # a recipe that gathers statistics reads it: same error through the API
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    with pytest.raises(UserError, match="empty"):
        compress(model, [stage(NEEDS_DATA)], tokenizer=tok, calib=CalibConfig(source=str(empty), n_samples=2, seqlen=16))
    missing = tmp_path / "missing.txt"
    argv[argv.index("--calib-data") + 1] = str(missing)
    cli_fails(capsys, argv, str(missing), "not found")
    assert listing(outs) == []


def test_empty_evaluation_file(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = _fast(tiny_model_dir, tiny_text_file, outs / "result", "--recipe", "rtn-w8")
    argv[argv.index("--eval-data") + 1] = str(empty)
    cli_fails(capsys, argv, str(empty), "empty")
    assert listing(outs) == []
    with pytest.raises(UserError, match="empty"):
        llmpress.evaluate(str(tiny_model_dir), EvalConfig(source=str(empty), seqlen=32, max_windows=2), progress=False)
    # the eval command fails the same way
    cli_fails(capsys, ["eval", str(tiny_model_dir), "--eval-data", str(empty), "--seqlen", "32", "--no-progress"], "empty")


def test_eval_text_shorter_than_a_window(tmp_path, outs, tiny_model_dir, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    argv = _fast(tiny_model_dir, short, outs / "result", "--recipe", "rtn-w8")
    cli_fails(capsys, argv, "fewer than one window")
    assert listing(outs) == []


# ---------------------------------------------------------------------------- output folder


def test_existing_out_without_overwrite(outs, tiny_model_dir, tiny_text_file, capsys):
    out = outs / "result"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    cli_fails(capsys, _fast(tiny_model_dir, tiny_text_file, out, "--recipe", "rtn-w8"), str(out), "--overwrite")
    assert listing(outs) == ["result"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    with pytest.raises(UserError, match="exists"):
        run_pipeline(str(tiny_model_dir), "rtn-w8", out=str(out))
    # with --overwrite the folder is replaced, and nothing else is left beside it
    assert main(_fast(tiny_model_dir, tiny_text_file, out, "--recipe", "rtn-w8", "--overwrite")) == 0
    assert listing(outs) == ["report.json", "result"]
    assert not (out / "keep.txt").exists() and (out / "llmpress.json").exists()


# ---------------------------------------------------------------------------------- success


def test_successful_cli_run(outs, tiny_model_dir, tiny_text_file, capsys):
    out = outs / "result"
    rc = main(_fast(tiny_model_dir, tiny_text_file, out, "--recipe", "rtn-w4a8"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "perplexity" in cap.out and f"saved: {out}" in cap.out
    assert listing(outs) == ["report.json", "result"]
    assert out.is_dir() and (out / "config.json").exists() and (out / "llmpress.json").exists()
    meta = json.loads((out / "llmpress.json").read_text())  # the saved folder's manifest
    assert isinstance(meta, dict) and meta.get("format", "").startswith("llmpress-")

    rep = json.loads((outs / "report.json").read_text())
    for key in ("baseline", "compressed", "bits_per_weight", "size_mb", "seconds", "peak_rss_mb", "recipe", "model"):
        assert key in rep, key
    assert rep["model"] == str(tiny_model_dir)
    assert rep["recipe"]["name"] == "rtn-w4a8"
    assert rep["bits_per_weight"] == rep["compressed"]["bits_per_weight"] == 4.25  # 4 bits + a 16-bit scale per 64
    assert rep["baseline"]["bits_per_weight"] == 16
    assert 0 < rep["size_mb"] == rep["compressed"]["size_mb"] < rep["baseline"]["size_mb"]
    assert rep["peak_rss_mb"] > 0 and rep["seconds"]["load"] >= 0 and "compress_total" in rep["seconds"]
    assert rep["evaluation"]["windows"] == 2 and rep["calibration"] == {}  # RTN: no calibration data
    assert all(v["weights"] == "int4 sym g64" and v["activations"] == "int8 sym per-token" for v in rep["layers"].values())
    assert len(rep["layers"]) == 14
    bppl, cppl = rep["baseline"]["ppl"], rep["compressed"]["ppl"]
    assert 1 < bppl and 1 < cppl and bppl != cppl
    assert rep["ppl_ratio"] == pytest.approx(cppl / bppl)

    model, tok = llmpress.load_compressed(str(out))
    # the loaded folder reproduces the reported perplexity (weights and activation quantization kept)
    windows = evaluation_windows(tok, model, EvalConfig(source=str(tiny_text_file), seqlen=32, max_windows=2))
    assert windows.shape == (2, 32)
    ppl = perplexity(model, windows)
    assert ppl == pytest.approx(cppl, rel=1e-3) and ppl != pytest.approx(bppl, rel=1e-5)
    # the baseline model on the same windows gives the reported baseline
    base, _ = llmpress.load(str(tiny_model_dir))
    assert perplexity(base, windows) == pytest.approx(bppl, rel=1e-5)


def test_recipes_lists_one_preset_per_line(capsys):
    assert main(["recipes"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    names = [ln.split()[0] for ln in lines]
    assert names == list(presets()) and len(lines) == len(presets())
    assert {"rtn-w8", "rtn-w4g64", "ternary"} <= set(names)
    for ln, n in zip(lines, names):
        assert ln.split(None, 1)[1].strip() == load_recipe(n).description
