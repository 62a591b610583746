"""The engine hands malloc's free memory back after each linear's solve, and
benchmarks/compress_memory.py measures a compress with and without it."""

from bench_scripts import load_script
from conftest import random_windows, tiny_llama
from helpers import QUIET

import llmpress.calib.block as block
from llmpress import compress

cm = load_script("compress_memory")


def test_engine_trims_after_every_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(block, "trim_malloc", lambda: calls.append(1))
    model = tiny_llama()
    compress(model, "gptq-w4g64", data=random_windows(4, 32), engine=QUIET)
    assert len(calls) == 2 * 7  # two blocks of q, k, v, o, gate, up, down


def test_script_reports_start_peak_and_after(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(block, "trim_malloc", block.trim_malloc)  # restored after --no-trim replaces it
    for extra, trim in (([], True), (["--no-trim"], False)):
        res = cm.main(["--model", str(tiny_model_dir), "--recipe", "gptq-w4g64", "--calib", "2", *extra])
        assert res["trim"] is trim and res["recipe"] == "gptq-w4g64" and res["calib"] == 2
        assert 0 < res["start_mb"] <= res["peak_mb"] and res["after_trim_mb"] <= res["peak_mb"]
    assert block.trim_malloc.__name__ == "<lambda>"  # --no-trim took effect in this process (restored after)
