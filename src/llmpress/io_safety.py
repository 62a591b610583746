"""Outputs written safely: checked before any work, locked, replaced atomically.

Every file and folder llmpress writes goes through one of two helpers. ``atomic_file``
(``write_atomic``) writes a temporary file beside the target and renames it over the
target. ``atomic_folder`` fills a temporary sibling ``.NAME.tmp-PID-XXXX`` and then puts
it in place of ``out`` (``replace_folder``): where the system can, old and new are
swapped in one step (Linux ``renameat2(RENAME_EXCHANGE)``), else the old folder is
renamed aside to ``.NAME.old-PID`` first and removed only once the new one is in place.
A crash at any point leaves the old or the new complete folder, never a half-written
``out``; if it struck between the two renames, the next run with the same ``--out``
puts the old folder back.

While a run works towards ``out`` it holds the lock file ``.NAME.lock`` (its PID inside)
next to it: a second run with the same ``--out`` is refused while the first is alive. A
run killed outright (SIGKILL, power loss) leaves its lock and temporary sibling behind;
the next run with the same ``--out`` removes them once their PID is dead, with one notice.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def resume_path(out: Path) -> Path:
    """Where a run towards ``out`` keeps its finished blocks (llmpress.calib.resume)."""
    return out.with_name(f".{out.name}.resume")


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

    def acquire(self) -> OutputLock:
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
            raise UserError(
                f"output {str(self.out)!r}: cannot create folder {str(self.out.parent)!r} ({_os_reason(e)}); choose another --out"
            ) from None
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
                raise UserError(
                    f"output {str(self.out)!r}: cannot write in {str(self.out.parent)!r} ({_os_reason(e)}); choose another --out"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self._clean_leftovers(stale_notice)
            return
        raise UserError(f"output {str(self.out)!r}: could not take the lock {str(lp)!r}; is another run starting? try again")

    def _clean_leftovers(self, removed: list[str]) -> None:
        for p, pid in _leftovers(self.out):
            if pid == os.getpid() or pid_alive(pid):
                continue
            if p.name.startswith(f".{self.out.name}.old-") and not os.path.lexists(self.out):
                os.replace(p, self.out)  # killed between the two renames of replace_folder
                log.warning("put back %s: a run killed while replacing it had left it as %s", self.out, p.name)
                continue
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

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)


def _read_pid(p: Path) -> int | None:
    try:
        return int(p.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def replace_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished ``tmp`` in place of ``out``; an existing ``out`` (``overwrite``)
    goes only once ``tmp`` is in place: swapped in one step where the system can, else
    renamed aside first (put back if the second rename fails, or by the next run)."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    if not overwrite:
        raise UserError(f"output folder {str(out)!r} exists; pass --overwrite to replace it, or choose another --out")
    if not out.is_dir():
        raise UserError(f"output {str(out)!r} is an existing file, not a folder; choose another --out (--overwrite replaces folders only)")
    if _exchange(tmp, out):
        _remove(tmp)  # now the old folder
        return
    aside = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    _remove(aside)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False, with nothing changed, where that is not available."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextmanager
def atomic_folder(out: Path, *, overwrite: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """A new temporary sibling of ``out`` to fill. When the block ends without error its
    files get ordinary permissions and it takes ``out``'s place (:func:`replace_folder`);
    otherwise it is removed and ``out`` is left as it was. ``keep_existing``: an ``out``
    that appeared meanwhile (a concurrent writer of the same cache entry) is kept and
    this one dropped."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    try:
        yield tmp
        normalize_permissions(tmp)  # mkdtemp and safetensors make private files; outputs are ordinary
        if keep_existing and os.path.lexists(out):
            _remove(tmp)
        else:
            replace_folder(tmp, out, overwrite)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_file(path: Path, *, suffix: str = "") -> Iterator[Path]:
    """A temporary file beside ``path`` to write. When the block ends without error it gets
    the mode a new file gets and is renamed over ``path``; otherwise it is removed and
    ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # mkstemp makes it private; an output file is ordinary
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a whole file (text or bytes) through :func:`atomic_file`: never half-written."""
    with atomic_file(Path(path)) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def write_error(out: Path, e: OSError) -> UserError:
    """The one-line error of a failed write (disk full, permissions) into ``out``."""
    hint = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions and space"
    kept = "the existing folder was left as it was" if out.exists() else "nothing was written"
    return UserError(f"could not write {str(out)!r}: {_os_reason(e)}; {hint} and run again ({kept})")


def file_mode(executable: bool = False) -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 (0o777 for folders)
    less the process umask."""
    return (0o777 if executable else 0o666) & ~_umask()


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # read it by setting it (not thread-safe: the fallback only)
    os.umask(mask)
    return mask


def normalize_permissions(folder: str | os.PathLike) -> None:
    """Give every file under ``folder`` the ordinary mode (umask honoured) and the folders
    theirs: writers that go through a private temporary (safetensors' ``save_file``,
    ``tempfile``) leave 0600 files behind."""
    root = Path(folder)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        p.chmod(file_mode(executable=p.is_dir()))
