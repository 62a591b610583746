"""The same `llmpress compress` command twice writes the same checkpoint, byte for byte.

Run A: the CLI in this process, after scrambling torch's global random state (a method
drawing from the global generator instead of one seeded from ``--seed`` would differ).
Run B: the same command lines in a fresh interpreter with another ``PYTHONHASHSEED``
(set and dict iteration orders, and the hash-ordered maps of native libraries, differ
between processes: safetensors wrote its header metadata in such an order until the
packed writer kept a single key). Both runs write to the same ``--out`` and ``--json``
paths, so the command lines are identical; each output is moved aside afterwards.

Compared: every file of the output folder byte for byte, except llmpress.json and the
``--json`` report, which are compared as JSON without the fields that measure the run
rather than its result (``TIMING_KEYS`` and ``TIMING_PREFIX``: the report's ``seconds``, its per-phase
``memory`` table, ``checkpoint_bytes`` (it counts llmpress.json, timings included), and every
``peak_*`` field, i.e. peak RSS / GPU memory and the phase that set them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llmpress.cli import main
from llmpress.export.packed import WEIGHTS_FILE

PRESETS = ("rtn-w4g64", "gptq-w4g64", "awq-w4g64", "sparsegpt-50", "smoothquant-w8a8")
TIMING_KEYS = ("seconds", "memory", "checkpoint_bytes")  # wall time per stage; peak RSS per phase; the folder's bytes,
# which include llmpress.json and so the length of the timings written in it (every other file is compared byte for byte)
TIMING_PREFIX = "peak_"  # peak_rss_mb, peak_gpu_mb, peak_rss_phase


def _argv(model_dir: Path, text: Path, work: Path, preset: str, seed: int = 0) -> list[str]:
    return [
        "compress", str(model_dir), "--recipe", preset, "--out", str(work / "out"), "--json", str(work / "report.json"),
        "--calib-data", str(text), "--eval-data", str(text), "--calib-samples", "8", "--calib-seqlen", "32",
        "--seqlen", "32", "--eval-windows", "2", "--seed", str(seed),
    ]  # fmt: skip


def _move(work: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    os.replace(work / "out", dest / "out")
    os.replace(work / "report.json", dest / "report.json")
    return dest


def _strip_timing(obj):
    """``obj`` without the run-measuring fields (at any depth)."""
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS and not k.startswith(TIMING_PREFIX)}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two runs' outputs (``a``/``b`` hold ``out/`` and ``report.json``)."""
    diffs = []
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return [f"file lists differ: {files_a} vs {files_b}"]
    for rel in files_a:
        if rel.name in ("llmpress.json", "report.json"):
            ja, jb = (json.loads((root / rel).read_text()) for root in (a, b))
            if _strip_timing(ja) != _strip_timing(jb):
                diffs.append(f"{rel}: JSON differs beyond timing fields")
        elif (a / rel).read_bytes() != (b / rel).read_bytes():
            diffs.append(f"{rel}: bytes differ")
    return diffs


_RUN_B = textwrap.dedent(
    """
    import json, os, sys
    from llmpress.cli import main
    for argv, work, dest in json.load(sys.stdin):
        rc = main(argv)
        if rc:
            sys.exit(f"exit code {rc}: {argv}")
        os.makedirs(dest)
        for name in ("out", "report.json"):
            os.replace(os.path.join(work, name), os.path.join(dest, name))
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each preset compressed twice with identical command lines: {preset: (dir A, dir B)}."""
    from conftest import TINY_TEXT, tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("determinism")
    tok = tiny_tokenizer()
    model_dir = root / "tiny-llama"
    tiny_llama(vocab=len(tok)).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text(TINY_TEXT * 5)
    work = root / "work"
    work.mkdir()

    torch.manual_seed(1234)  # the global generator is not where a method's randomness may come from
    torch.rand(17)
    for preset in PRESETS:
        assert main(_argv(model_dir, text, work, preset)) == 0, preset
        _move(work, root / "a" / preset)

    jobs = [(_argv(model_dir, text, work, p), str(work), str(root / "b" / p)) for p in PRESETS]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-c", _RUN_B], input=json.dumps(jobs), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"model_dir": model_dir, "text": text, "work": work, "root": root} | {p: (root / "a" / p, root / "b" / p) for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_same_command_twice_same_checkpoint(runs, preset):
    a, b = runs[preset]
    assert (a / "out" / WEIGHTS_FILE).stat().st_size > 0
    assert differences(a, b) == []
    ma = json.loads((a / "out" / "llmpress.json").read_text())
    assert ma["report"]["seconds"], "the timing fields excluded from the comparison exist"
    assert ma["report"]["compressed"]["ppl"] > 0  # the evaluation ran, and its result is compared


def test_a_different_seed_gives_a_different_checkpoint(runs):
    """The comparison can fail: --seed 1 draws other calibration windows, so GPTQ solves other problems."""
    work = runs["work"]
    assert main(_argv(runs["model_dir"], runs["text"], work, "gptq-w4g64", seed=1)) == 0
    c = _move(work, runs["root"] / "c" / "gptq-w4g64")
    a, _ = runs["gptq-w4g64"]
    diffs = differences(a, c)
    assert f"out/{WEIGHTS_FILE}: bytes differ" in diffs
    assert "out/llmpress.json: JSON differs beyond timing fields" in diffs  # tensor hashes and calibration seed


def test_comparison_ignores_only_timing_fields(tmp_path):
    """A report differing in seconds / peak memory compares equal; any other field does not."""
    runs = (
        (
            "a",
            {
                "seconds": {"load": 1.0},
                "peak_rss_mb": 400.0,
                "peak_rss_phase": "load",
                "memory": {"phases": [{"phase": "load", "peak_rss_mb": 400.0}]},
            },
        ),
        (
            "b",
            {
                "seconds": {"load": 2.5},
                "peak_rss_mb": 512.0,
                "peak_rss_phase": "save",
                "memory": {"phases": [{"phase": "load", "peak_rss_mb": 380.0}]},
            },
        ),
    )
    for name, extra in runs:
        (tmp_path / name / "out").mkdir(parents=True)
        (tmp_path / name / "out" / "llmpress.json").write_text(json.dumps({"report": {"compressed": {"ppl": 3.0}, **extra}}))
        (tmp_path / name / "report.json").write_text(json.dumps({"compressed": {"ppl": 3.0}, **extra}))
    assert differences(tmp_path / "a", tmp_path / "b") == []
    (tmp_path / "b" / "report.json").write_text(json.dumps({"compressed": {"ppl": 3.5}, "seconds": {}}))
    assert differences(tmp_path / "a", tmp_path / "b") == ["report.json: JSON differs beyond timing fields"]
    shutil.copy(tmp_path / "a" / "report.json", tmp_path / "b" / "report.json")
    (tmp_path / "b" / "out" / WEIGHTS_FILE).write_bytes(b"x")
    assert differences(tmp_path / "a", tmp_path / "b")[0].startswith("file lists differ")
