"""benchmarks/common.Bench writes its JSON after every row and resumes an interrupted run with the
same model and settings (and only then)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from common import Bench  # noqa: E402

SETTINGS = {"eval_windows": 4, "calib_samples": 8, "seqlen": 32, "seed": 0, "sources": ["wiki", "news"]}


def _bench(out, settings=SETTINGS, name="tiny") -> Bench:
    b = object.__new__(Bench)  # no model: only the bookkeeping is under test
    b.name, b.out, b.settings, b.rows = name, str(out), dict(settings), []
    return b


def test_rows_saved_as_they_finish_and_resumed(tmp_path):
    out = tmp_path / "r.json"
    b = _bench(out)
    b.fp, b.fp_ppl = {"wiki": 10.0, "news": 20.0}, 10.0
    b.add_row("full precision", dict(b.fp), 32.0, 1.0, 0.0)
    b.add_row("rtn", {"wiki": 15.0, "news": 30.0}, 4.25, 1.0, 2.0)
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["rows"]] == ["full precision", "rtn"]
    assert saved["rows"][1]["ratio_by_source"] == {"wiki": 1.5, "news": 1.5}
    again = _bench(out)
    assert again._resume()
    assert again.fp == {"wiki": 10.0, "news": 20.0} and again.fp_ppl == 10.0
    assert again.done("rtn")["bits_per_weight"] == 4.25
    assert again.done("gptq") is None
    # a row already there is returned without compressing anything (no model is loaded here)
    assert again.run("rtn", recipe=None)["ppl"] == 15.0


def test_other_settings_or_model_not_resumed(tmp_path):
    out = tmp_path / "r.json"
    b = _bench(out)
    b.fp, b.fp_ppl = {"wiki": 10.0, "news": 20.0}, 10.0
    b.add_row("full precision", dict(b.fp), 32.0, 1.0, 0.0)
    assert not _bench(out, {**SETTINGS, "eval_windows": 64})._resume()
    assert not _bench(out, name="other")._resume()
    assert not _bench(tmp_path / "missing.json")._resume()


def test_extra_keys_kept_across_saves(tmp_path):
    out = tmp_path / "r.json"
    b = _bench(out)
    b.fp, b.fp_ppl = {"wiki": 10.0}, 10.0
    b.add_row("full precision", dict(b.fp), 32.0, 1.0, 0.0)
    data = json.loads(out.read_text())
    data["decode"] = {"tok_s": 5}
    out.write_text(json.dumps(data))
    b.add_row("rtn", {"wiki": 12.0}, 4.25, 1.0, 2.0)
    assert json.loads(out.read_text())["decode"] == {"tok_s": 5}


def test_a_json_without_table_settings_keeps_its_sections(tmp_path):
    """A file holding only another section (lowrank.py --serve writes one) is not resumed, but
    the first table row keeps that section; a file of other settings loses its sections."""
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"serve": {"tok_s": 7}}))
    b = _bench(out)
    assert not b._resume()
    b.fp, b.fp_ppl = {"wiki": 10.0}, 10.0
    b.add_row("full precision", dict(b.fp), 32.0, 1.0, 0.0)
    saved = json.loads(out.read_text())
    assert saved["serve"] == {"tok_s": 7} and [r["method"] for r in saved["rows"]] == ["full precision"]
    other = _bench(out, {**SETTINGS, "eval_windows": 64})
    other.fp, other.fp_ppl = {"wiki": 11.0}, 11.0
    other.add_row("full precision", dict(other.fp), 32.0, 1.0, 0.0)
    assert "serve" not in json.loads(out.read_text())
