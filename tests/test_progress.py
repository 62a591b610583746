"""Progress on every long step (llmpress.progress): plain lines off a terminal, tqdm on one,
one switch (EngineOptions.progress / --no-progress / scope) that silences every bar and notice."""

from __future__ import annotations

import io
import json
import logging
import os
import re

import pytest
import torch
from conftest import tiny_llama

from llmpress import compress, progress
from llmpress.calib.engine import EngineOptions
from llmpress.eval.perplexity import perplexity
from llmpress.recipe import stage
from llmpress.runtime import cpu_kernels

PLAIN = re.compile(r"^(?P<desc>[^:]+): +(?P<pct>\d+)% (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \[[^\]]+\]")


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln]


def _parsed(err: str, desc: str) -> list[tuple[int, int, int]]:
    """(percent, n, total) of every plain line of the bar ``desc``."""
    out = []
    for ln in _lines(err):
        m = PLAIN.match(ln)
        if m and m["desc"] == desc:
            out.append((int(m["pct"]), int(m["n"]), int(m["total"])))
    return out


# --------------------------------------------------------------------------- the facility


def test_plain_bar_prints_quarters_only(capsys):
    with progress.bar(40, "step", "it") as b:
        for i in range(40):
            b.update(1, f"loss {i}")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert _parsed(err, "step") == [(0, 0, 40), (25, 10, 40), (50, 20, 40), (75, 30, 40), (100, 40, 40)]
    assert _lines(err)[-1].endswith("loss 39")
    assert len(_lines(err)) == 5


def test_plain_heartbeat_when_a_step_is_slow(capsys, monkeypatch):
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)  # every update is "long after" the last line
    with progress.bar(3, "slow", "it") as b:
        for _ in range(3):
            b.update(1)
    assert [p[1] for p in _parsed(capsys.readouterr().err, "slow")] == [0, 1, 2, 3]


def test_nested_plain_bar_is_a_suffix_of_its_parent(capsys, monkeypatch):
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)
    with progress.bar(2, "outer", "block") as outer:
        with progress.bar(4, "inner", "try") as inner:
            inner.update(2, "alpha 0.5")
        outer.update(1)
        outer.update(1)
    lines = _lines(capsys.readouterr().err)
    assert not any(ln.startswith("inner") for ln in lines)  # no lines of its own
    assert any(ln.startswith("outer:") and ln.endswith("| inner 2/4 alpha 0.5") for ln in lines)
    assert lines[-1].startswith("outer: 100% 2/2")


def test_unfinished_bar_prints_no_100_line(capsys):
    with pytest.raises(RuntimeError):
        for i in progress.track(range(8), "fails", "it"):
            if i == 5:
                raise RuntimeError("boom")
    got = _parsed(capsys.readouterr().err, "fails")
    assert got[-1][0] < 100 and got[0] == (0, 0, 8)


def test_scope_silences_everything_and_does_not_leak(capsys):
    assert progress.enabled()
    with progress.scope(False):
        assert not progress.enabled()
        with progress.scope(True):  # silence wins
            assert not progress.enabled()
            progress.note("hidden")
            for _ in progress.track(range(3), "hidden", "it"):
                pass
        with progress.scope(None):
            assert not progress.enabled()
    assert progress.enabled()  # reset on exit
    assert capsys.readouterr().err == ""


@pytest.fixture
def shown_notes():
    """Notes shown as the command line shows them (progress.show_notes)."""
    with progress.show_notes():
        yield


def test_the_library_logs_notes_and_prints_nothing(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="llmpress.progress"):
        progress.note("logged")
        with progress.scope(False):
            progress.note("hidden")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [("llmpress.progress", logging.INFO, "logged")]
    assert capsys.readouterr().err == ""


def test_notes_shown_as_bare_lines_where_the_cli_asks(capsys, shown_notes):
    with progress.show_notes():  # nests: still one handler
        progress.note("shown")
    assert capsys.readouterr().err == "shown\n"
    with progress.scope(False):
        progress.note("hidden")
    assert capsys.readouterr().err == ""


def test_bar_with_on_false_or_nothing_to_do_is_silent(capsys):
    for _ in progress.track(range(3), "off", "it", on=False):
        pass
    for _ in progress.track([], "empty", "it"):
        pass
    assert capsys.readouterr().err == ""


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_tqdm_bar(monkeypatch):
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    for _ in progress.track(range(3), "drawn", "it"):
        pass
    frames = tty.getvalue().split("\r")  # redrawn in place: the first frame, then the finished bar
    assert frames[0] == "" and frames[1].startswith("drawn:   0%|") and " 0/3 " in frames[1]
    assert frames[-1].startswith("drawn: 100%|##########| 3/3 [") and frames[-1].endswith("it/s]\n")


def test_a_terminal_without_a_size_gets_plain_lines():
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as f:
            assert f.isatty() and not progress.is_terminal(f)  # 0 columns: tqdm would draw nothing
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            assert progress.is_terminal(f)
    finally:
        os.close(master)
        os.close(slave)


# --------------------------------------------------------------------------- the long steps


@pytest.fixture
def calib():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def _run(st, calib, on: bool):
    compress(tiny_llama(), [st], calib, engine=EngineOptions(batch_size=4, progress=on))


SPIN = dict(steps=4, windows=4, seqlen=16, val_windows=2, val_every=2)


def test_spinquant_reports_steps_loss_and_heldout(capsys, calib):
    _run(stage("spinquant", **SPIN), calib, True)
    err = capsys.readouterr().err
    assert "\r" not in err
    got = _parsed(err, "spinquant rotations")
    assert got[0] == (0, 0, 4) and got[-1] == (100, 4, 4)
    last = [ln for ln in _lines(err) if ln.startswith("spinquant rotations: 100%")][0]
    assert re.search(r"loss \d+\.\d{3}, held-out \d+\.\d{3}", last)


def test_duquant_reports_each_rotation(capsys, calib):
    _run(stage("duquant", windows=4, block_size=16, steps=4), calib, True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert _parsed(err, "duquant statistics") == [(0, 0, 1), (100, 1, 1)]  # 4 windows, one batch of 4
    got = _parsed(err, "duquant search")
    # offline residual (1) + per block o_proj and down_proj inputs (2 x 2 blocks)
    assert got[0] == (0, 0, 5) and got[-1] == (100, 5, 5)
    assert _lines(err)[-1].endswith("block 1 down_in")


def test_awq_reports_blocks_and_its_search(capsys, calib, monkeypatch):
    _run(stage("awq", grid=4), calib, True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert _parsed(err, "compress (awq)") == [(0, 0, 2), (50, 1, 2), (100, 2, 2)]
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)  # a slow search shows its position
    _run(stage("awq", grid=4), calib, True)
    err = capsys.readouterr().err
    assert re.search(r"^compress \(awq\): .* \| awq block 0 \d+/\d+ (scales|clip) ", err, re.M)


@pytest.mark.parametrize(
    "st",
    [
        stage("spinquant", **SPIN),
        stage("duquant", windows=4, block_size=16, steps=4),
        stage("awq", grid=4),
        stage("rtn", weights={"observer": "mse"}),
    ],
    ids=["spinquant", "duquant", "awq", "rtn-mse"],
)
def test_progress_off_prints_nothing(capsys, calib, st):
    _run(st, calib, False)
    assert capsys.readouterr().err == ""


def test_mse_observer_reports_per_linear(capsys, calib):
    _run(stage("rtn", weights={"observer": "mse"}), calib, True)
    got = _parsed(capsys.readouterr().err, "compress (rtn)")
    assert got[0] == (0, 0, 14) and got[-1] == (100, 14, 14)  # 7 linears x 2 blocks


def test_perplexity_bar_follows_its_flag_and_the_scope(capsys):
    m, w = tiny_llama(), torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    ppl = perplexity(m, w, 2, True, "ppl")
    assert _parsed(capsys.readouterr().err, "ppl")[-1] == (100, 2, 2)
    with progress.scope(False):
        assert perplexity(m, w, 2, True, "ppl") == pytest.approx(ppl)
    assert perplexity(m, w, 2, False, "ppl") == pytest.approx(ppl)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- kernel build


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """torch's extension builder replaced: records calls, 'compiles' by writing the .so."""
    import torch.utils.cpp_extension as ext

    calls = []

    def load(*, name, build_directory, **_kw):
        calls.append(name)
        (tmp_path / "done").write_text("")
        return None

    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ext, "load", load)
    return calls


def test_kernel_build_says_so_on_first_use_only(capsys, fake_build, tmp_path, shown_notes):
    cpu_kernels._build()
    err = capsys.readouterr().err
    assert _lines(err)[0] == cpu_kernels.BUILD_NOTICE == "building llmpress CPU kernels (first use, ~1 min)..."
    assert re.fullmatch(r"llmpress CPU kernels built in \d+ s \(cached in .+\)", _lines(err)[1])
    so = next((tmp_path / "cache" / "kernels").iterdir()) / f"{fake_build[0]}.so"
    so.write_bytes(b"")  # what a finished build leaves: the next load is from the cache
    cpu_kernels._build()
    assert capsys.readouterr().err == "" and len(fake_build) == 2


def test_kernel_build_notice_is_silenced(capsys, fake_build):
    with progress.scope(False):
        cpu_kernels._build()
    assert capsys.readouterr().err == "" and fake_build


def test_eval_cli_kernel_notice_follows_no_progress(capsys, fake_build, monkeypatch, tmp_path, tiny_model_dir, tiny_text_file):
    from llmpress.cli import main

    out = tmp_path / "w4"
    assert main(["compress", str(tiny_model_dir), "--recipe", "rtn-w4g64", "--out", str(out), "--no-eval", "--no-progress"]) == 0
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: None)
    args = ["eval", str(out), "--eval-data", str(tiny_text_file), "--eval-windows", "2", "--seqlen", "32"]
    figures = []
    for flags, shown in ((["--no-progress"], False), ([], True)):
        monkeypatch.setattr(cpu_kernels, "_state", {})  # a fresh process: kernels not loaded yet
        capsys.readouterr()
        assert main(args + flags) == 0
        cap = capsys.readouterr()
        assert (cpu_kernels.BUILD_NOTICE in cap.err) is shown
        assert ("ppl:" in cap.err) is shown
        figures.append(json.loads(cap.out[cap.out.index("{") :]))
    quiet, loud = figures  # progress changes what is printed, never the figures
    assert quiet == loud and quiet["ppl_by_source"] == {str(tiny_text_file): quiet["ppl"]}
    assert 1 < quiet["ppl"] < 1000 and quiet["bits_per_weight"] == 4.25  # W4 g64: 4 bits + a 16-bit scale per 64


def test_cli_compress_log_has_lines_not_redraws(capsys, tmp_path, tiny_model_dir, tiny_text_file):
    """A whole `llmpress compress` into a log file: every step's lines, no '\\r' (transformers' own bars off)."""
    from llmpress.cli import main

    args = [
        "compress",
        str(tiny_model_dir),
        "--recipe",
        "rtn-w4g64",
        "--out",
        str(tmp_path / "o"),
        "--format",
        "hf-fakequant",
        "--eval-data",
        str(tiny_text_file),
        "--eval-windows",
        "2",
        "--seqlen",
        "32",
    ]
    capsys.readouterr()  # drop what the fixtures printed while saving the tiny model
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [ln.split(":")[0] for ln in _lines(err) if "100%" in ln] == ["baseline ppl", "compress (rtn)", "compressed ppl"]
    assert main(args[:5] + [str(tmp_path / "o2")] + args[6:] + ["--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_the_command_line_leaves_the_loggers_as_it_found_them(capsys):
    from llmpress import cli

    notes, root = logging.getLogger("llmpress.progress"), logging.getLogger()
    before = list(notes.handlers), notes.level, notes.propagate
    root_before = list(root.handlers), root.level
    assert cli.main(["recipes"]) == 0
    assert (list(notes.handlers), notes.level, notes.propagate) == before
    assert (list(root.handlers), root.level) == root_before  # basicConfig(force=True) undone
    with progress.show_notes():
        assert len(notes.handlers) == len(before[0]) + 1 and notes.propagate is False
    assert (list(notes.handlers), notes.level, notes.propagate) == before
