"""Structured pruning's bad input through the CLI: exit code 2, one line, nothing written
(the rows of docs/errors.md); refused right after loading, before the baseline evaluation."""

from __future__ import annotations

import pytest
from conftest import save_tiny_model
from helpers import cli_fails, listing

pytestmark = pytest.mark.usefixtures("restore_logging", "private_cache")


def _run(model_dir, text, out, recipe):
    return [
        "compress", str(model_dir), "--recipe", str(recipe), "--out", str(out), "--eval-data", str(text), "--seqlen", "32",
        "--calib-seqlen", "32", "--eval-windows", "2", "--calib-samples", "4", "--no-progress",
    ]  # fmt: skip


def _recipe(tmp_path, text: str):
    p = tmp_path / "recipe.yaml"
    p.write_text("stages:\n  - " + text + "\n")
    return p


def test_structured_ratio_of_one(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys):
    r = _recipe(tmp_path, "{method: prune_width, structure: mlp, ratio: 1.0}")
    cli_fails(capsys, _run(tiny_model_dir, tiny_text_file, outs / "o", r), "ratio=1.0", "[0, 1)")
    r = _recipe(tmp_path, "{method: drop_layers, fraction: 1.0}")
    cli_fails(capsys, _run(tiny_model_dir, tiny_text_file, outs / "o", r), "fraction=1.0", "[0, 1)")
    assert listing(outs) == []


def test_structured_removes_every_head(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys):
    r = _recipe(tmp_path, "{method: prune_width, structure: heads, ratio: 0.8}")
    cli_fails(capsys, _run(tiny_model_dir, tiny_text_file, outs / "o", r), "removing 80% of 2 key/value groups", "remove fewer")
    r = _recipe(tmp_path, "{method: drop_layers, count: 2}")
    cli_fails(capsys, _run(tiny_model_dir, tiny_text_file, outs / "o", r), "removing 2 of 2 decoder blocks leaves none")
    assert listing(outs) == []


def test_distill_stage_out_of_place(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys):
    r = _recipe(tmp_path, "{method: distill, steps: 5}")
    cli_fails(capsys, _run(tiny_model_dir, tiny_text_file, outs / "o", r), "recipe stage 0 (distill): nothing before it")
    r.write_text("stages:\n  - {method: drop_layers, count: 1}\n  - {method: rtn, weights: {bits: 4}}\n  - {method: distill}\n")
    cli_fails(capsys, _run(tiny_model_dir, tiny_text_file, outs / "o", r), "recipe stage 2 (distill) runs before", "before stage 1 (rtn)")
    assert listing(outs) == []


def test_structured_missing_structure(tmp_path, outs, tiny_text_file, capsys):
    gemma = save_tiny_model(tmp_path / "tiny-gemma", "gemma3")
    r = _recipe(tmp_path, "{method: slicegpt, fraction: 0.25}")
    cli_fails(capsys, _run(gemma, tiny_text_file, outs / "o", r), "slicegpt: gemma3", "post_attention_layernorm")
    r = _recipe(tmp_path, "{method: prune_width, structure: experts}")
    cli_fails(capsys, _run(gemma, tiny_text_file, outs / "o", r), "structure='experts'", "mlp, heads, query_heads")
    assert listing(outs) == []


def test_slice_that_rounds_back_to_nothing(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys):
    """64 hidden channels, 4 heads, multiple_of 32: 25% keeps 48, which rounds to 64 in steps of
    32; refused when the recipe is planned, before anything is written."""
    r = _recipe(tmp_path, "{method: slicegpt, fraction: 0.25, multiple_of: 32}")
    cli_fails(capsys, _run(tiny_model_dir, tiny_text_file, outs / "o", r), "slices nothing of 64", "in steps of 32")
    assert listing(outs) == []
