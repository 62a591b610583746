"""Output folders written safely: checked before any work, locked, replaced atomically.

An output folder ``out`` is written as a temporary sibling ``.NAME.tmp-PID-XXXX`` and
renamed at the end, so an interrupted run never leaves a half-written ``out``. While a
run works towards ``out`` it holds the lock file ``.NAME.lock`` (its PID inside) next
to it: a second run with the same ``--out`` is refused while the first is alive. A run
killed outright (SIGKILL, power loss) leaves its lock and temporary sibling behind; the
next run with the same ``--out`` removes them once their PID is dead, with one notice.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def temp_sibling(out: Path) -> Path:
    """A new private folder beside ``out`` whose name carries this process's PID."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the renamed folder is an ordinary output
    return tmp


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _os_reason(e: OSError) -> str:
    return e.strerror or errno.errorcode.get(e.errno or 0, type(e).__name__)


def _existing_ancestor(p: Path) -> Path:
    for a in (p, *p.parents):
        if os.path.lexists(a):
            return a
    return Path(p.anchor or ".")


def _same_or_inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it (paths resolved)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_out(out: str | os.PathLike, overwrite: bool, *, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an output folder that cannot be written, before any work is done.

    ``inputs``: folders the run reads; ``out`` may neither be one of them, lie inside one,
    nor contain one (``--overwrite`` would delete it).
    """
    p = Path(out).expanduser()
    if p.name in ("", ".", ".."):
        raise UserError(f"output {str(out)!r} names no folder; pass --out as a new folder path such as runs/result")
    for src in inputs:
        if _same_or_inside(p, src) or _same_or_inside(src, p):
            raise UserError(f"output {str(p)!r} would overwrite the input {str(src)!r}; choose an --out outside it")
    if p.exists() and not p.is_dir():
        raise UserError(f"output {str(p)!r} is an existing file, not a folder; choose another --out (--overwrite replaces folders only)")
    if p.exists() and not overwrite:
        raise UserError(f"output folder {str(p)!r} exists; pass --overwrite to replace it, or choose another --out")
    anc = _existing_ancestor(p.parent)
    if not anc.is_dir():
        raise UserError(f"output {str(p)!r}: {str(anc)!r} is a file, not a folder; choose another --out")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"output {str(p)!r}: folder {str(anc)!r} is not writable; choose an --out in a writable folder")
    return p


def check_file_out(path: str | os.PathLike | None, what: str = "--json") -> None:
    """A file output (a report) that could not be written at the end: refused now."""
    if not path:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{what} {str(p)!r} is a folder; pass a file path such as runs/report.json")
    anc = _existing_ancestor(p.parent)
    if not anc.is_dir() or not _can_create_in(anc):
        raise UserError(f"{what} {str(p)!r}: folder {str(anc)!r} is not writable; choose a path in a writable folder")


def check_work_folder(path: str | os.PathLike | None, what: str = "--offload-dir") -> None:
    """A folder the run will write into (made if missing): refused now if it cannot be."""
    if not path:
        return
    p = Path(path).expanduser()
    anc = _existing_ancestor(p)
    if not anc.is_dir():
        raise UserError(f"{what} {str(p)!r}: {str(anc)!r} is a file, not a folder; pass a folder path")
    if not _can_create_in(anc):
        raise UserError(f"{what} {str(p)!r}: folder {str(anc)!r} is not writable; choose a path in a writable folder")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder`` (tried, then removed: permissions alone lie to root)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".llmpress-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp-(?P<tpid>\d+)-.*|old-(?P<opid>\d+))$")


def _leftovers(out: Path) -> list[tuple[Path, int]]:
    """Temporary siblings of ``out`` (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) with their PIDs."""
    found = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    for e in entries:
        m = _LEFTOVER.match(e.name)
        if m and m["name"] == out.name:
            found.append((e, int(m["tpid"] or m["opid"])))
    return found


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@dataclass(kw_only=True)
class OutputLock:
    """``.NAME.lock`` beside ``out`` while a run works towards it (a context manager)."""

    out: Path
    created_dirs: list[Path] = field(default_factory=list)
    held: bool = False

    def acquire(self) -> "OutputLock":
        self._make_parents()
        try:
            self._take(stale_notice=[])
        except BaseException:
            self._remove_created_dirs()
            raise
        self.held = True
        return self

    def _make_parents(self) -> None:
        missing = [a for a in (self.out.parent, *self.out.parent.parents) if not os.path.lexists(a)]
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.created_dirs = [a for a in missing if a.is_dir()]
            self._remove_created_dirs()
            raise UserError(f"output {str(self.out)!r}: cannot create folder {str(self.out.parent)!r} ({_os_reason(e)}); choose another --out") from None
        self.created_dirs = missing  # deepest first: removed in this order if the run fails

    def _take(self, stale_notice: list[str]) -> None:
        lp = lock_path(self.out)
        for _ in range(3):
            try:
                fd = os.open(lp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = _read_pid(lp)
                if pid is not None and pid_alive(pid):
                    raise UserError(
                        f"output {str(self.out)!r} is being written by another llmpress run (pid {pid}); wait for it to finish "
                        f"or choose another --out (if no such run exists, delete {str(lp)!r})"
                    ) from None
                lp.unlink(missing_ok=True)  # a dead run's lock: taken over below
                stale_notice.append(lp.name)
                continue
            except OSError as e:
                raise UserError(f"output {str(self.out)!r}: cannot write in {str(self.out.parent)!r} ({_os_reason(e)}); choose another --out") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self._clean_leftovers(stale_notice)
            return
        raise UserError(f"output {str(self.out)!r}: could not take the lock {str(lp)!r}; is another run starting? try again")

    def _clean_leftovers(self, removed: list[str]) -> None:
        for p, pid in _leftovers(self.out):
            if pid != os.getpid() and not pid_alive(pid):
                _remove(p)
                removed.append(p.name)
        if removed:
            log.warning("removed what an interrupted run left beside %s: %s", self.out, ", ".join(sorted(removed)))

    def release(self, *, failed: bool = False) -> None:
        if self.held:
            lp = lock_path(self.out)
            if _read_pid(lp) == os.getpid():
                lp.unlink(missing_ok=True)
            self.held = False
        if failed:
            self._remove_created_dirs()

    def _remove_created_dirs(self) -> None:
        for d in self.created_dirs:
            try:
                d.rmdir()  # only if empty: never removes anything else
            except OSError:
                break
        self.created_dirs = []

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)


def _read_pid(p: Path) -> int | None:
    try:
        return int(p.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def replace_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` goes only once ``tmp`` is in place."""
    if os.path.lexists(out):
        if not overwrite:
            raise UserError(f"output folder {str(out)!r} exists; pass --overwrite to replace it, or choose another --out")
        if not out.is_dir():
            raise UserError(f"output {str(out)!r} is an existing file, not a folder; choose another --out (--overwrite replaces folders only)")
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(trash, out)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_error(out: Path, e: OSError) -> UserError:
    """The one-line error of a failed write (disk full, permissions) into ``out``."""
    hint = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions and space"
    kept = "the existing folder was left as it was" if out.exists() else "nothing was written"
    return UserError(f"could not write {str(out)!r}: {_os_reason(e)}; {hint} and run again ({kept})")
