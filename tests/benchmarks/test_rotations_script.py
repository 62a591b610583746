"""benchmarks/rotations.py: the GPTQ rows' damping flag and which runs may be merged."""

import pytest
from bench_scripts import load_script

rot = load_script("rotations")


def _stages(row_method, **kw):
    return rot.quant_stages(row_method, rot.COLUMNS["W4A4KV4"], smooth=False, **kw)


def test_gptq_damp_reaches_only_the_gptq_stage():
    assert _stages("gptq", gptq_damp=0.3)[-1].config.damp == 0.3
    assert _stages("gptq")[-1].config.damp == _stages("gptq", gptq_damp=None)[-1].config.damp != 0.3
    assert [s.method for s in _stages("rtn", gptq_damp=0.3)] == ["kv_quant", "rtn"]  # RTN rows take no damping


def _run(rows, damp, fp=20.0):
    args = {"eval_windows": 32, "seqlen": 512, "calib_windows": 64, "seed": 0, "spin_steps": 40, "eval": "wiki,news,code", "gptq_damp": damp}
    return {
        "model": "m",
        "args": args,
        "fp": {"ppl": fp},
        "rows": {r: {"label": r, "columns": {"W4A4KV4": {"ppl": 1.0}}} for r in rows},
        "rotations": {},
    }


def test_merge_checks_the_damping_of_gptq_rows_only():
    merged = rot.merge([_run(["quarot-rtn"], None), _run(["quarot-gptq"], 0.3)])  # RTN rows do not depend on it
    assert set(merged["rows"]) == {"quarot-rtn", "quarot-gptq"}
    with pytest.raises(SystemExit, match="gptq-damp"):
        rot.merge([_run(["quarot-gptq"], None), _run(["quarot-online-gptq"], 0.3)])
    with pytest.raises(SystemExit, match="full-precision"):
        rot.merge([_run(["quarot-rtn"], None), _run(["quarot-online-rtn"], None, fp=21.0)])
