"""Bad input through ``llmpress.cli.main``: exit code 2, one line, no traceback, nothing written.

Each test here is a row of docs/errors.md (test_errors_table_matches_the_tests keeps the
two in step). The rows already right before issue 13 live in tests/test_cli_errors.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import save_tiny_model
from helpers import cli_fails, listing

from llmpress import api
from llmpress.cli import main

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("restore_logging", "private_cache")


def _argv(model_dir, text, out, *extra, recipe="rtn-w4g64"):
    """Default flags, progress on; only the sizes shrunk for the tiny model."""
    return [
        "compress", str(model_dir), "--recipe", recipe, "--out", str(out), "--eval-data", str(text),
        "--seqlen", "32", "--calib-seqlen", "32", "--eval-windows", "2", "--calib-samples", "4", *extra,
    ]  # fmt: skip


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _never(*_a, **_k):
    raise AssertionError("reached a step the checks should have stopped before")


@pytest.fixture
def packed_ckpt(tmp_path, tiny_model_dir, tiny_text_file):
    """A packed checkpoint written by `llmpress compress` (RTN, no evaluation)."""
    ck = tmp_path / "ckpts" / "ck"
    assert main(["compress", str(tiny_model_dir), "--recipe", "rtn-w4g64", "--out", str(ck), "--no-eval", "--no-progress"]) == 0
    return ck


# ------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("damage", ["truncated", "garbage", "cut-tail"])
def test_damaged_model_weights(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch, damage):
    f = tiny_model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[:1000], "garbage": b"\x00" * 64, "cut-tail": data[:-100]}[damage])
    monkeypatch.setattr(api, "perplexity", _never)
    cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, outs / "result"), "model.safetensors is damaged or truncated", "download or convert")
    assert listing(outs) == []
    # `eval` of the same folder says the same
    cli_fails(capsys, ["eval", str(tiny_model_dir), "--eval-data", str(tiny_text_file), "--seqlen", "32"], "model.safetensors is damaged")


def test_config_disagrees_with_weights(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the tensors are 128 wide
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(api, "perplexity", _never)
    msg = cli_fails(
        capsys,
        _argv(tiny_model_dir, tiny_text_file, outs / "result"),
        "config.json disagrees with the weights",
        "model.layers.0.mlp.down_proj.weight is [64, 128] in model.safetensors",
        "config.json implies [64, 96]",
    )
    assert "(and 5 more tensors)" in msg  # gate, up, down of two layers
    assert listing(outs) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_weights_refused_before_baseline(tmp_path, outs, tiny_text_file, capsys, monkeypatch, bad):
    def poison(m):
        m.model.layers[1].mlp.down_proj.weight[3, 5] = bad

    d = save_tiny_model(tmp_path / "nan-model", mutate=poison)
    monkeypatch.setattr(api, "perplexity", _never)  # refused before the baseline evaluation
    kind = "1 NaN and 0 Inf" if bad != bad else "0 NaN and 1 Inf"
    cli_fails(capsys, _argv(d, tiny_text_file, outs / "result"), "model.layers.1.mlp.down_proj.weight", kind, "damaged")
    assert listing(outs) == []
    # a calibrated method is refused the same way, before any block is solved
    cli_fails(capsys, _argv(d, tiny_text_file, outs / "result", "--calib-data", str(tiny_text_file), recipe="gptq-w4g64"), "down_proj.weight")
    assert listing(outs) == []


# ------------------------------------------------------------------------------ the recipe


def _recipe_fails(tmp_path, outs, model_dir, text, capsys, yaml: str, *fragments) -> None:
    """A recipe file with ``yaml`` is refused with a line holding ``fragments``; nothing is written."""
    p = tmp_path / "r.yaml"
    p.write_text(yaml)
    cli_fails(capsys, _argv(model_dir, text, outs / "result", recipe=str(p)), *fragments)
    assert listing(outs) == []


@pytest.mark.parametrize("bits", [0, 99])
def test_bits_out_of_range(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, bits):
    yaml = f"stages:\n  - method: rtn\n    weights: {{bits: {bits}}}\n"
    _recipe_fails(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, yaml, f"bits={bits}", "2 to 8 bits")


def test_group_size_seven(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch):
    monkeypatch.setattr(api, "perplexity", _never)
    yaml = "stages:\n  - method: rtn\n    weights: {bits: 4, group_size: 7}\n"
    _recipe_fails(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, yaml, "group_size 7 does not divide the input dimension 64")


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1"])
def test_sparsity_out_of_range(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, sparsity):
    yaml = f"stages:\n  - method: magnitude\n    sparsity: {sparsity}\n"
    _recipe_fails(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, yaml, f"sparsity={sparsity}", "[0, 1)")


def test_targets_matching_nothing(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch):
    monkeypatch.setattr(api, "perplexity", _never)
    yaml = "stages:\n  - method: rtn\n    targets: ['re:.*no_such_proj']\n    weights: {bits: 4}\n"
    _recipe_fails(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, yaml, "stage 0 (rtn) matches no linear layer", "no_such_proj")


# -------------------------------------------------------------------------------- the data


@pytest.mark.parametrize(
    ("flag", "value", "low"),
    [("--calib-samples", "0", 1), ("--calib-samples", "-1", 1), ("--seqlen", "0", 2), ("--seqlen", "1", 2),
     ("--calib-seqlen", "0", 2), ("--batch-size", "0", 1)],
)  # fmt: skip
def test_sizes_below_one(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, flag, value, low):
    argv = _argv(tiny_model_dir, tiny_text_file, outs / "result", "--calib-data", str(tiny_text_file), recipe="gptq-w4g64")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    cli_fails(capsys, argv, f"llmpress: error: argument {flag}: must be at least {low}, got {int(value)}", "llmpress compress --help")
    assert listing(outs) == []
    # the API refuses the same settings (no ZeroDivisionError, no empty tensor deep inside)
    field = {"--calib-samples": "n_samples", "--calib-seqlen": "seqlen", "--batch-size": "batch_size"}.get(flag)
    with pytest.raises(api.UserError, match=re.escape(flag)):
        api.CalibConfig(**{field: int(value)}) if field else api.EvalConfig(seqlen=int(value))


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_eval_windows_invalid(outs, tiny_model_dir, tiny_text_file, capsys, value):
    argv = _argv(tiny_model_dir, tiny_text_file, outs / "result")
    argv[argv.index("--eval-windows") + 1] = value
    expect = f"expected an integer or 'all', got {value!r}" if value == "abc" else "must be at least 1"
    cli_fails(capsys, argv, "argument --eval-windows", expect)
    assert listing(outs) == []


@pytest.mark.parametrize("content", ["garbage", "field-less"])
def test_calibration_jsonl_unusable(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, content):
    f = tmp_path / "calib.jsonl"
    f.write_text('{"text": "fine"}\n' + ("this is not json\n" if content == "garbage" else '{"body": "no text field"}\n'))
    argv = _argv(tiny_model_dir, tiny_text_file, outs / "result", "--calib-data", str(f), recipe="gptq-w4g64")
    cli_fails(capsys, argv, str(f), "line 2", "is not JSON" if content == "garbage" else "no string field 'text'")
    assert listing(outs) == []


def test_calibration_text_shorter_than_a_window(tmp_path, outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    monkeypatch.setattr(api, "perplexity", _never)  # refused before the baseline evaluation
    cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, outs / "result", "--calib-data", str(short), recipe="gptq-w4g64"),
           "calibration text has", "need more than 32")  # fmt: skip
    assert listing(outs) == []


def test_calib_data_for_a_recipe_without_data(outs, tiny_model_dir, tiny_text_file, capsys):
    rc = main(_argv(tiny_model_dir, tiny_text_file, outs / "result", "--calib-data", str(tiny_text_file), "--no-eval"))
    err = capsys.readouterr().err
    assert rc == 0, err
    warn = [ln for ln in err.splitlines() if "warning" in ln]
    assert warn == [f"llmpress: warning: --calib-data {tiny_text_file} is not used: recipe rtn-w4g64 gathers no calibration data"]
    # not given: no warning
    assert main(_argv(tiny_model_dir, tiny_text_file, outs / "r2", "--no-eval")) == 0
    assert "warning" not in capsys.readouterr().err
    # a mix: the same warning, once every file in it exists
    mix = f"news:0.25,{tiny_text_file}:0.75"
    assert main(_argv(tiny_model_dir, tiny_text_file, outs / "r3", "--calib-data", mix, "--no-eval")) == 0
    assert [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln] == [
        f"llmpress: warning: --calib-data {mix} is not used: recipe rtn-w4g64 gathers no calibration data"
    ]


@pytest.mark.parametrize("flag, value, fragment", [
    ("--calib-data", "wiki,,news", "calibration data (--calib-data) 'wiki,,news': empty item"),
    ("--calib-data", "news,wiki,news", "calibration data (--calib-data) 'news,wiki,news': news is listed twice"),
    ("--eval-data", "wiki,", "evaluation data (--eval-data) 'wiki,': empty item"),
    ("--eval-data", "code,code", "evaluation data (--eval-data) 'code,code': code is listed twice"),
])  # fmt: skip
def test_source_list_malformed(outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch, flag, value, fragment):
    monkeypatch.setattr("llmpress.models.load", _never)  # refused before loading the model
    for recipe in ("gptq-w4g64", "rtn-w4g64"):  # also when the recipe would not read the calibration text
        cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, outs / "result", flag, value, recipe=recipe), fragment)
    assert listing(outs) == []
    if flag == "--eval-data":
        cli_fails(capsys, ["eval", str(tiny_model_dir), "--eval-data", value, "--seqlen", "32"], fragment)


@pytest.mark.parametrize("value, fragment", [
    ("wiki:0.5,news:0.3", "shares sum to 0.8, expected 1"),
    ("wiki:abc,news:0.5", "share 'abc' of wiki is not a number"),
    ("wiki:0,news:1", "share 0 of wiki must be a number greater than 0"),
    ("wiki:-0.5,news:1.5", "share -0.5 of wiki must be a number greater than 0"),
    ("wiki:0.5,news", "give a share for every source or for none"),
])  # fmt: skip
def test_calib_shares_invalid(outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch, value, fragment):
    monkeypatch.setattr("llmpress.models.load", _never)  # refused before loading the model
    argv = _argv(tiny_model_dir, tiny_text_file, outs / "result", "--calib-data", value, recipe="gptq-w4g64")
    cli_fails(capsys, argv, f"calibration data (--calib-data) '{value}': {fragment}")
    assert listing(outs) == []


def test_unknown_source_in_a_list(outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch):
    monkeypatch.setattr("llmpress.models.load", _never)  # refused before loading the model
    known = "(packaged texts: wiki, news, code)"
    for recipe in ("gptq-w4g64", "rtn-w4g64"):  # a mix with an unknown name is an error, not the unused-data warning
        cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, outs / "result", "--calib-data", "wiki:0.5,wikii:0.5", recipe=recipe),
               "llmpress: error: text file 'wikii' not found", known)  # fmt: skip
    missing = outs.parent / "missing.txt"
    cli_fails(capsys, _argv(tiny_model_dir, f"news,{missing}", outs / "result"), f"text file '{missing}' not found", known)
    cli_fails(capsys, ["eval", str(tiny_model_dir), "--eval-data", f"{tiny_text_file},nws", "--seqlen", "32"], "text file 'nws' not found", known)
    assert listing(outs) == []


# ------------------------------------------------------------------------------ the output


def test_out_is_an_existing_file(outs, tiny_model_dir, tiny_text_file, capsys):
    outs.mkdir()
    f = outs / "result"
    f.write_text("precious")
    for extra in ((), ("--overwrite",)):  # the same one message, with or without --overwrite
        msg = cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, f, *extra), "is an existing file, not a folder", "choose another --out")
        assert "pass --overwrite" not in msg
    assert listing(outs) == ["result"] and f.read_text() == "precious"


def test_out_not_writable(tmp_path, tiny_model_dir, tiny_text_file, capsys, monkeypatch):
    monkeypatch.setattr("llmpress.models.load", _never)  # refused before loading the model
    cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, "/proc/llmpress-out"), "output '/proc/llmpress-out'", "choose another --out")
    cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, "/proc/llmpress/deeper"), "cannot create folder", "choose another --out")
    assert not os.path.lexists("/proc/llmpress-out") and not os.path.lexists("/proc/.llmpress-out.lock")
    # a file where a parent folder should be
    (tmp_path / "afile").write_text("x")
    cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, tmp_path / "afile" / "result"), "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"
    # the --json report too, before any work
    argv = _argv(tiny_model_dir, tiny_text_file, tmp_path / "outs" / "result", "--json", "/proc/llmpress-report.json")
    cli_fails(capsys, argv, "--json '/proc/llmpress-report.json'", "not writable")
    argv = _argv(tiny_model_dir, tiny_text_file, tmp_path / "outs" / "result", "--json", str(tmp_path))
    cli_fails(capsys, argv, f"--json '{tmp_path}' is a folder", "pass a file path")
    argv = _argv(tiny_model_dir, tiny_text_file, tmp_path / "outs" / "result", "--offload-dir", str(tmp_path / "afile" / "act"))
    cli_fails(capsys, argv, "--offload-dir", "is a file, not a folder")
    argv = _argv(tiny_model_dir, tiny_text_file, tmp_path / "outs" / "result", "--offload-dir", "/proc/llmpress-act")
    cli_fails(capsys, argv, "--offload-dir '/proc/llmpress-act'", "not writable")
    assert listing(tmp_path / "outs") == [] and (tmp_path / "afile").read_text() == "x"


def test_out_locked_by_a_live_run(outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch):
    outs.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (outs / ".result.lock").write_text(f"{sleeper.pid}\n")
        monkeypatch.setattr("llmpress.models.load", _never)
        cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, outs / "result"), "is being written by another llmpress run", f"pid {sleeper.pid}")
        assert listing(outs) == [".result.lock"] and (outs / ".result.lock").read_text() == f"{sleeper.pid}\n"
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same lock once its run is dead: taken over, one notice, the run succeeds
    monkeypatch.undo()
    monkeypatch.setenv("LLMPRESS_CACHE", str(outs.parent / "cache"))
    rc = main(_argv(tiny_model_dir, tiny_text_file, outs / "result", "--no-eval"))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [ln for ln in err.splitlines() if "interrupted run" in ln] == [
        f"WARNING llmpress.io_safety: removed what an interrupted run left beside {outs / 'result'}: .result.lock"
    ]
    assert listing(outs) == ["result"]


def test_export_out_is_a_file(tmp_path, packed_ckpt, capsys):
    f = tmp_path / "somefile"
    f.write_text("precious")
    for extra in ((), ("--overwrite",)):
        cli_fails(capsys, ["export", str(packed_ckpt), "--out", str(f), *extra], "is an existing file, not a folder")
    assert f.read_text() == "precious"


def test_export_out_is_its_input(tmp_path, packed_ckpt, capsys):
    before = _tree(packed_ckpt)
    cli_fails(capsys, ["export", str(packed_ckpt), "--out", str(packed_ckpt), "--overwrite"], "would overwrite the input", "outside it")
    cli_fails(capsys, ["export", str(packed_ckpt), "--out", str(packed_ckpt / "ct"), "--overwrite"], "would overwrite the input")
    cli_fails(capsys, ["export", str(packed_ckpt), "--out", str(packed_ckpt.parent), "--overwrite"], "would overwrite the input")
    assert _tree(packed_ckpt) == before and listing(packed_ckpt.parent) == ["ck"]


def _enospc_after(n_bytes: int):
    """A safetensors writer that writes ``n_bytes`` and then finds the disk full."""

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * n_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    return save_file


def test_disk_full_during_save(outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch):
    out = outs / "result"
    assert main(_argv(tiny_model_dir, tiny_text_file, out, "--no-eval", "--no-progress")) == 0
    before = _tree(out)
    capsys.readouterr()
    monkeypatch.setattr("safetensors.torch.save_file", _enospc_after(4096))
    msg = cli_fails(
        capsys, _argv(tiny_model_dir, tiny_text_file, out, "--no-eval", "--overwrite"), f"could not write '{out}'", "No space left on device"
    )
    assert msg.endswith("free some space and run again (the existing folder was left as it was)")
    assert listing(outs) == ["result"] and _tree(out) == before
    # a new output: nothing at all is left
    msg = cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, outs / "new", "--no-eval"), "No space left on device", "(nothing was written)")
    assert listing(outs) == ["result"]
    # export: the same
    monkeypatch.setattr("safetensors.torch.save_file", _enospc_after(10))
    cli_fails(capsys, ["export", str(out), "--out", str(outs / "ct")], "No space left on device")
    assert listing(outs) == ["result"] and _tree(out) == before


_KILLED_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import safetensors.torch as st
    real = st.save_file
    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        os.kill(os.getpid(), signal.SIGKILL)  # killed outright after the weights file, mid-save
    st.save_file = save_file
    from llmpress.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigkill_mid_save_leaves_a_temp_the_next_run_removes(outs, tiny_model_dir, tiny_text_file, capsys):
    out = outs / "result"
    argv = _argv(tiny_model_dir, tiny_text_file, out, "--no-eval", "--no-progress")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_MID_SAVE, *argv], env=env, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr
    left = listing(outs)  # the lock and the temporary sibling, both named with the dead run's PID
    assert len(left) == 2 and left[0] == ".result.lock" and left[1].startswith(f".result.tmp-{proc.pid}-"), left
    assert (outs / ".result.lock").read_text() == f"{proc.pid}\n"
    assert (outs / left[1] / "model.llmpress.safetensors").exists()  # the half-written folder
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        f"WARNING llmpress.io_safety: removed what an interrupted run left beside {out}: .result.lock, {left[1]}"
    ]
    assert listing(outs) == ["result"] and (out / "llmpress.json").exists()


def test_temp_of_a_live_run_is_kept(outs, tiny_model_dir, tiny_text_file, capsys):
    """Only dead runs' leftovers go: a live PID's temporary folder (another output's run) stays."""
    outs.mkdir()
    live = outs / f".result.tmp-{os.getppid()}-abc"
    live.mkdir()
    other = outs / ".other.tmp-999999999-abc"
    other.mkdir()
    assert main(_argv(tiny_model_dir, tiny_text_file, outs / "result", "--no-eval", "--no-progress")) == 0
    assert listing(outs) == [other.name, live.name, "result"]
    assert "interrupted run" not in capsys.readouterr().err


# --------------------------------------------------------------------------- checkpoints


def test_truncated_packed_checkpoint(tmp_path, packed_ckpt, tiny_text_file, capsys):
    f = packed_ckpt / "model.llmpress.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    cli_fails(capsys, ["eval", str(packed_ckpt), "--eval-data", str(tiny_text_file), "--seqlen", "32"], "truncated or replaced")
    cli_fails(capsys, ["export", str(packed_ckpt), "--out", str(tmp_path / "ct")], "truncated or replaced")
    assert not [n for n in listing(tmp_path) if n == "ct" or n.startswith(".ct.")]


def test_future_packed_format(tmp_path, packed_ckpt, tiny_text_file, capsys):
    meta_file = packed_ckpt / "llmpress.json"
    meta = json.loads(meta_file.read_text())
    meta["format"] = "llmpress-packed-v99"
    meta_file.write_text(json.dumps(meta))
    before = _tree(packed_ckpt)
    newer = "written by a newer llmpress (format llmpress-packed-v99; this llmpress reads up to llmpress-packed-v"
    cli_fails(capsys, ["eval", str(packed_ckpt), "--eval-data", str(tiny_text_file), "--seqlen", "32"], newer, "upgrade llmpress")
    cli_fails(capsys, ["export", str(packed_ckpt), "--out", str(tmp_path / "ct")], newer, "upgrade llmpress")
    assert not [n for n in listing(tmp_path) if n == "ct" or n.startswith(".ct.")] and _tree(packed_ckpt) == before


# ------------------------------------------------------------------------------ interrupts


@pytest.mark.parametrize("where", ["baseline", "save"])
def test_ctrl_c(outs, tiny_model_dir, tiny_text_file, capsys, monkeypatch, where):
    out = outs / "result"
    if where == "save":  # an existing output survives an interrupted --overwrite
        assert main(_argv(tiny_model_dir, tiny_text_file, out, "--no-eval", "--no-progress")) == 0
    before = _tree(out) if out.exists() else None
    capsys.readouterr()

    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "perplexity", interrupt) if where == "baseline" else monkeypatch.setattr("safetensors.torch.save_file", interrupt)
    cli_fails(capsys, _argv(tiny_model_dir, tiny_text_file, out, "--overwrite"), "llmpress: interrupted; no output was written", code=130)
    assert listing(outs) == ([] if before is None else ["result"])
    assert before is None or _tree(out) == before


# ------------------------------------------------------------------------------ the table


def test_errors_table_matches_the_tests():
    """docs/errors.md names a test for each row; each exists, and each test here has a row."""
    rows = [ln for ln in (ROOT / "docs" / "errors.md").read_text().splitlines() if ln.startswith("|")][2:]
    assert len(rows) >= 30
    ids = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 3, row
        if cells[2].startswith("TODO"):
            continue
        assert cells[1].lstrip("`").startswith(("llmpress: ", "WARNING llmpress")), row  # the exact line or its stable prefix
        ids += re.findall(r"`(tests/(?:\w+/)*test_\w+\.py::test_\w+)`", cells[2]) or pytest.fail(f"no test id: {row}")
    for tid in ids:
        path, name = tid.split("::")
        src = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", src, re.M), f"{tid} named in docs/errors.md does not exist"
    here = set(re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(), re.M)) - {"test_errors_table_matches_the_tests"}
    assert here <= {t.split("::")[1] for t in ids if t.startswith("tests/test_bad_input.py")}
