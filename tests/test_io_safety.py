"""The one file helper and the one folder helper: a failure at any point leaves the old
output complete and no temporary behind; a run killed between two renames is undone."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from llmpress import io_safety
from llmpress.errors import UserError
from llmpress.io_safety import OutputLock, atomic_file, atomic_folder, file_mode, write_atomic


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _old_output(parent: Path) -> Path:
    out = parent / "result"
    (out / "sub").mkdir(parents=True)
    (out / "a.json").write_text('{"old": 1}')
    (out / "sub" / "b.bin").write_bytes(b"\x01\x02")
    return out


class _Boom(Exception):
    pass


# ------------------------------------------------------------------------------ files


def test_write_atomic_text_and_bytes(tmp_path):
    p = tmp_path / "deep" / "report.json"
    write_atomic(p, "text\n")
    assert p.read_text() == "text\n"
    write_atomic(p, b"\x00bytes")
    assert p.read_bytes() == b"\x00bytes"
    assert p.stat().st_mode & 0o777 == file_mode()
    assert _listing(p.parent) == ["report.json"]


def test_file_failure_mid_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "report.json"
    p.write_text("old")
    with pytest.raises(_Boom):
        with atomic_file(p) as tmp:
            tmp.write_text("half of the ne")
            raise _Boom
    assert p.read_text() == "old" and _listing(tmp_path) == ["report.json"]


def test_file_failure_at_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "report.json"
    p.write_text("old")

    def no_space(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_safety.os, "replace", no_space)
    with pytest.raises(OSError):
        write_atomic(p, "new")
    assert p.read_text() == "old" and _listing(tmp_path) == ["report.json"]


def test_atomic_file_suffix(tmp_path):
    seen = []
    with atomic_file(tmp_path / "ids.npy", suffix=".npy") as tmp:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")
    assert seen[0].startswith(".ids.npy.") and seen[0].endswith(".npy")
    assert _listing(tmp_path) == ["ids.npy"]


# ------------------------------------------------------------------------------ folders


def test_new_folder(tmp_path):
    out = tmp_path / "a" / "result"
    with atomic_folder(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(f".result.tmp-{os.getpid()}-")
        (tmp / "f.txt").write_text("new")
    assert _tree(out) == {"f.txt": b"new"} and _listing(out.parent) == ["result"]
    assert (out / "f.txt").stat().st_mode & 0o777 == file_mode()
    assert out.stat().st_mode & 0o777 == file_mode(executable=True)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_overwrite_replaces_the_whole_folder(tmp_path, monkeypatch, exchange):
    out = _old_output(tmp_path)
    if not exchange:
        monkeypatch.setattr(io_safety, "_exchange", lambda a, b: False)
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "c.txt").write_text("new")
    assert _tree(out) == {"c.txt": b"new"} and _listing(tmp_path) == ["result"]


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    if not io_safety._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) not available here")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_folder_failure_mid_write_keeps_the_old_folder(tmp_path, monkeypatch, exchange):
    out = _old_output(tmp_path)
    before = _tree(out)
    if not exchange:
        monkeypatch.setattr(io_safety, "_exchange", lambda a, b: False)
    with pytest.raises(_Boom):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "a.json").write_text('{"new"')
            raise _Boom
    assert _tree(out) == before and _listing(tmp_path) == ["result"]


def test_folder_failure_between_the_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = _old_output(tmp_path)
    before = _tree(out)
    monkeypatch.setattr(io_safety, "_exchange", lambda a, b: False)
    real = os.replace

    def fail_into_out(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".result.tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(io_safety.os, "replace", fail_into_out)
    with pytest.raises(OSError):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "c.txt").write_text("new")
    assert _tree(out) == before and _listing(tmp_path) == ["result"]


def test_existing_folder_without_overwrite_is_refused_and_kept(tmp_path):
    out = _old_output(tmp_path)
    before = _tree(out)
    with pytest.raises(UserError, match="pass --overwrite"):
        with atomic_folder(out) as tmp:
            (tmp / "c.txt").write_text("new")
    assert _tree(out) == before and _listing(tmp_path) == ["result"]


def test_keep_existing_drops_the_late_copy(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out, keep_existing=True) as tmp:
        (tmp / "f").write_text("ours")
        out.mkdir()  # a concurrent writer finished first
        (out / "f").write_text("theirs")
    assert (out / "f").read_text() == "theirs" and _listing(tmp_path) == ["model"]


def test_run_killed_between_the_renames_is_undone_by_the_next(tmp_path, caplog):
    """Killed after moving the old folder aside and before the new one took its place:
    the next run with the same output puts the old folder back and removes the temporary."""
    out = _old_output(tmp_path)
    before = _tree(out)
    dead = 999999999
    os.replace(out, tmp_path / f".result.old-{dead}")
    half = tmp_path / f".result.tmp-{dead}-abc"
    half.mkdir()
    (half / "c.txt").write_text("new")
    with caplog.at_level(logging.WARNING, logger="llmpress.io_safety"):
        with OutputLock(out=out):
            assert _tree(out) == before
    assert _listing(tmp_path) == ["result"]
    assert f"put back {out}" in caplog.text and half.name in caplog.text


def test_export_failure_mid_write_keeps_the_previous_export(tmp_path, tiny_model_dir, monkeypatch, capsys, restore_logging, private_cache):
    """The compressed-tensors export over an existing export (--overwrite), the disk full
    while writing its weights: exit 2, one line, the previous export complete, no temporary."""
    from llmpress.cli import main

    ck, ct = tmp_path / "ck", tmp_path / "outs" / "ct"
    assert main(["compress", str(tiny_model_dir), "--recipe", "rtn-w4g64", "--out", str(ck), "--no-eval", "--no-progress"]) == 0
    assert main(["export", str(ck), "--out", str(ct)]) == 0
    before = _tree(ct)
    capsys.readouterr()

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr("safetensors.torch.save_file", save_file)
    assert main(["export", str(ck), "--out", str(ct), "--overwrite"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"llmpress: error: could not write '{ct}'"), err
    assert err[0].endswith("(the existing folder was left as it was)")
    assert _tree(ct) == before and _listing(ct.parent) == ["ct"]
