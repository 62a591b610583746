"""benchmarks/codebooks.py (issue 18): the table of a fabricated results JSON, the row picking,
and the W2 recipes built from the W3 presets (no model is loaded)."""

import dataclasses
import json

import pytest
from bench_scripts import load_script

cb = load_script("codebooks")

RES = {
    "model": "smollm2-135m",
    "windows": {"wiki": 64, "news": 25, "code": 64},
    "calib_samples": 128,
    "fp": {"wiki": 10.0, "news": 20.0, "code": 5.0},
    "rows": {
        "gptq-w2g64": {"ppl": {"wiki": 50.0, "news": 80.0, "code": 20.0}, "bits_per_weight": 2.25, "compress_s": 30.04},
        "squeezellm-w3-sparse0.45": {"ppl": {"wiki": 17.5, "news": 30.0, "code": 7.5}, "bits_per_weight": 3.6123, "compress_s": 12.0},
        "gptq-w4g64": {"ppl": {"wiki": 12.8, "news": 25.0, "code": 6.0}, "bits_per_weight": 4.25, "compress_s": 61.0},
        "someone-elses-row": {"ppl": {"wiki": 11.0}, "bits_per_weight": 8.0, "compress_s": 1.0},
    },
    "speed": {
        "config": {"batches": [1, 8]},
        "environment": {"threads": 2},
        "variants": {
            "rtn-w4g64": {
                "prefill_ms": 100.0,
                "decode_tok_s_b1": 50.0,
                "decode_tok_s_b8": 200.0,
                "checkpoint": {"file_bytes": 80e6},
                "linears_ms_per_step": 9.0,
                "head_ms_per_step": 3.0,
            },
            "squeezellm-w3": {
                "prefill_ms": 50.0,
                "decode_tok_s_b1": 75.0,
                "decode_tok_s_b8": 100.0,
                "checkpoint": {"file_bytes": 60e6},
                "linears_ms_per_step": 7.0,
                "head_ms_per_step": 3.0,
            },
            "bf16": {"prefill_ms": 80.0, "decode_tok_s_b1": 40.0, "decode_tok_s_b8": 150.0, "checkpoint": {"computed_bytes": 200e6}},
        },
    },
}


def test_table_values_classes_and_order():
    lines = cb.table(RES).splitlines()
    rows = [ln for ln in lines if ln.startswith("| ~") or ln.startswith("|  |")]
    assert rows == [
        "| ~4 | gptq-w4g64 | 12.800 (1.280x) | 25.000 (1.250x) | 6.000 (1.200x) | 4.250 | 61.0 |",
        "| ~3 | squeezellm-w3-sparse0.45 | 17.500 (1.750x) | 30.000 (1.500x) | 7.500 (1.500x) | 3.612 | 12.0 |",
        "| ~2 | gptq-w2g64 (gptq-w3g64 at 2 bits) | 50.000 (5.000x) | 80.000 (4.000x) | 20.000 (4.000x) | 2.250 | 30.0 |",
        "|  | someone-elses-row | 11.000 (1.100x) | - | - | 8.000 | 1.0 |",
    ]
    assert "fp32 wiki 10.000, news 20.000, code 5.000" in lines[0]
    assert "news 25" in lines[0] and "128 calibration windows" in lines[0]


def test_speed_table_ratios_against_the_int4_checkpoint():
    text = cb.table(RES)
    assert "| rtn-w4g64 | 100 (1.00x) | 50.0 (1.00x) | 200.0 (1.00x) | 6.00 (1.00x) + 3.00 | 80.0 |" in text
    assert "| squeezellm-w3 | 50 (2.00x) | 75.0 (1.50x) | 100.0 (0.50x) | 4.00 (1.50x) + 3.00 | 60.0 |" in text
    assert "| bf16 | 80 (1.25x) | 40.0 (0.80x) | 150.0 (0.75x) | - | 200.0 |" in text  # no per-step split recorded


def test_table_command_reads_the_json(tmp_path, capsys):
    path = tmp_path / "cb.json"
    path.write_text(json.dumps(RES))
    assert cb.main(["--table", "--out", str(path)]) == 0
    assert "| ~4 | gptq-w4g64 | 12.800 (1.280x)" in capsys.readouterr().out
    assert cb.main(["--table", "--out", str(tmp_path / "missing.json")]) == 2


def test_unknown_row_is_refused_before_any_model_loads(capsys):
    with pytest.raises(SystemExit) as e:
        cb.main(["--rows", "gptq-w4g64,nope", "--model", "/nonexistent"])
    assert e.value.code == 2
    assert "unknown row(s) nope" in capsys.readouterr().err


def test_w2_rows_are_the_w3_presets_at_two_bits():
    from llmpress.api import _as_recipe

    gptq = _as_recipe(cb.ROWS["gptq-w2g64"][1])
    assert [s.method for s in gptq.stages] == ["gptq"]
    w = gptq.stages[0].config.weights
    assert (w.bits, w.group_size, w.full_range) == (2, 64, True)
    w3 = _as_recipe("gptq-w3g64").stages[0].config
    assert (gptq.stages[0].config.damp, gptq.stages[0].config.shrink) == (w3.damp, w3.shrink)  # gptq-w3g64's regularizers kept
    rtn = _as_recipe(cb.ROWS["rtn-w2g64"][1]).stages[0].config.weights
    assert (rtn.bits, rtn.group_size, rtn.full_range) == (2, 64, True)


def test_rows_resume_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A finished row is written at once and skipped by the next run; a JSON made with other
    test windows is refused rather than mixed."""
    monkeypatch.setenv("LLMPRESS_TEST_SEQLEN", "32")
    out = tmp_path / "cb.json"
    args = ["--model", str(tiny_model_dir), "--windows", "2", "--calib", "4", "--rows", "rtn-w4g64", "--out", str(out)]
    assert cb.main(args) == 0
    first = json.loads(out.read_text())
    row = first["rows"]["rtn-w4g64"]
    assert row["bits_per_weight"] == pytest.approx(4.25)
    assert set(row["ppl"]) == set(first["fp"]) == {"wiki", "news", "code"}
    assert first["windows"] == {"wiki": 2, "news": 2, "code": 2}
    assert first["test_shrink"] == {"LLMPRESS_TEST_SEQLEN": "32"}
    assert cb.main(args) == 0
    assert "rtn-w4g64: in " in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == first["rows"]
    with pytest.raises(SystemExit) as e:
        cb.main(args[:3] + ["3"] + args[4:])
    assert e.value.code == 2
    assert "was made with other settings" in capsys.readouterr().err
    assert json.loads(out.read_text())["rows"] == first["rows"]


def test_save_ckpt_keeps_the_row_checkpoint_for_the_speed_section(tiny_model_dir, tmp_path, monkeypatch):
    from llmpress.export.packed_load import read_manifest

    monkeypatch.setenv("LLMPRESS_TEST_SEQLEN", "32")
    ck = tmp_path / "ck"
    args = [
        "--model",
        str(tiny_model_dir),
        "--windows",
        "2",
        "--calib",
        "4",
        "--rows",
        "rtn-w4g64",
        "--out",
        str(tmp_path / "cb.json"),
        "--ckpt",
        str(ck),
    ]
    assert cb.main(args) == 0
    assert read_manifest(ck / "rtn-w4g64") is None  # no checkpoint without --save-ckpt
    assert cb.main([*args[:-4], "--rows", "rtn-w3g64", *args[-4:], "--save-ckpt"]) == 0
    man = read_manifest(ck / "rtn-w3g64")
    assert man is not None and json.loads((tmp_path / "cb.json").read_text())["rows"].keys() == {"rtn-w4g64", "rtn-w3g64"}


def test_vq_rows_are_the_preset_and_its_named_variants():
    from llmpress.api import _as_recipe

    auto = _as_recipe(cb.ROWS["gptvq-4d-w2"][1]).stages[0].config  # the preset
    assert (auto.dim, auto.bits, auto.group_size, auto.table_bits, auto.table_budget, auto.em_rounds) == (4, 2, "auto", 8, 0.2, 3)
    layer = _as_recipe(cb.ROWS["gptvq-4d-w2-layer"][1]).stages[0].config
    g192 = _as_recipe(cb.ROWS["gptvq-4d-w2-g192"][1]).stages[0].config
    em1 = _as_recipe(cb.ROWS["gptvq-4d-w2-em1"][1]).stages[0].config
    assert (layer.group_size, layer.table_bits, g192.group_size, g192.table_bits) == (None, 16, 192, 16)
    assert layer.em_rounds == g192.em_rounds == em1.em_rounds == 1  # the rows as measured, before the preset's three rounds
    assert dataclasses.replace(em1, em_rounds=3) == auto
    awq = _as_recipe(cb.ROWS["awq-gptvq-4d-w2"][1])
    assert [s.method for s in awq.stages] == ["awq", "gptvq"] and awq.stages[1].config == em1
    assert awq.stages[0].config.quantize is False and awq.stages[0].config.weights.bits == 3
