"""Peak memory of this process (and of the GPU when one is used), overall and per phase.

:class:`PhaseTracker` splits a run into consecutive phases (load, baseline eval, compress,
...) and records the peak resident set size of each. On Linux the kernel's high-water mark
(``VmHWM`` in ``/proc/self/status``) is reset at every phase boundary by writing ``5`` to
``/proc/self/clear_refs``, so each phase's peak is exact. Where that is not possible the
tracker falls back to the process-wide high-water mark: a phase that raised it gets the
new mark (exact), a phase that did not gets ``None`` for its peak (``exact`` false) and
only its current RSS at the end.

Megabytes are 10**6 bytes throughout.
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import dataclass

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmHWM, VmRSS), or None off Linux."""
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_mb() -> float | None:
    """Current resident set size in MB (None where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024 / 1e6


def hwm_mb() -> float:
    """High-water mark of the resident set size in MB: since the process started or since
    the last :func:`reset_hwm`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024 / 1e6
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return maxrss / 1e6 if sys.platform == "darwin" else maxrss * 1024 / 1e6


def reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False where unsupported.

    Some kernels (sandboxes, emulated /proc) accept the write to ``clear_refs`` and leave
    the mark where it was, so the first call checks once that a reset really lowers it
    (:func:`_reset_lowers_the_mark`) and every later call trusts that answer."""
    global _reset_works
    if _reset_works is None:
        _reset_works = _reset_lowers_the_mark()
    return _reset_works and _write_clear_refs()


def _write_clear_refs() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


_PROBE_BYTES = 64 * 2**20  # an anonymous mapping, so freeing it returns the pages at once


def _reset_lowers_the_mark() -> bool:
    """Raise the mark by a touched 64 MiB mapping, unmap it, reset, and see the mark fall.
    Where the reset does not work the process mark keeps the probe's 64 MiB above the RSS
    of that moment (the first phase boundary, before the model is loaded, in the CLI)."""
    if _status_kib("VmHWM") is None:
        return False
    touch_and_unmap(_PROBE_BYTES)
    if not _write_clear_refs():
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and (hwm - rss) * 1024 < _PROBE_BYTES // 2


_reset_works: bool | None = None


def touch_and_unmap(nbytes: int) -> None:
    """Make ``nbytes`` resident (an anonymous mapping, every page touched) and unmap them:
    the mark rises by ``nbytes`` and the RSS falls back at once, whatever the allocator keeps."""
    import mmap

    buf = mmap.mmap(-1, nbytes)
    for off in range(0, nbytes, mmap.PAGESIZE):
        buf[off] = 1
    buf.close()


def trim_malloc() -> None:
    """Hand memory that glibc's malloc holds free back to the system (``malloc_trim``):
    without it the free space left by one forward pass (per-thread arenas, fragments
    between live blocks) stays resident and later passes add to it. No-op off glibc."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - raises AttributeError off glibc
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (since it started, unless a
    :class:`PhaseTracker` reset the mark: then use the tracker's :attr:`PhaseTracker.peak`)."""
    return hwm_mb()


def peak_gpu_mb() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 1e6


@dataclass(kw_only=True)
class Phase:
    name: str
    peak_rss_mb: float | None  # None: unknown (no reset and the process mark did not move)
    rss_start_mb: float | None
    rss_end_mb: float | None
    exact: bool

    def to_dict(self) -> dict:
        r = lambda v: None if v is None else round(v, 1)  # noqa: E731
        return {
            "phase": self.name,
            "peak_rss_mb": r(self.peak_rss_mb),
            "rss_start_mb": r(self.rss_start_mb),
            "rss_end_mb": r(self.rss_end_mb),
            "exact": self.exact,
        }


class PhaseTracker:
    """Consecutive phases of one run, each with its peak RSS.

    ``start(name)`` closes the running phase and opens the next; ``stop()`` closes the last.
    Everything before the first ``start`` (interpreter start, imports, argument parsing) is
    the phase ``startup``, so the phases cover the whole process up to ``stop()`` and the
    largest phase peak is the process peak.
    """

    def __init__(self, first: str = "startup") -> None:
        self.phases: list[Phase] = []
        self._name = first
        self._rss_start: float | None = None  # unknown: the phase began with the process
        self._mark = 0.0  # process-wide mark at the last boundary (fallback mode)
        self._resets = True
        self._open = True

    def start(self, name: str) -> None:
        if self._open:
            self._close()
        self._name, self._rss_start, self._open = name, rss_mb(), True

    def stop(self) -> None:
        if self._open:
            self._close()
            self._open = False

    def _close(self) -> None:
        hwm = hwm_mb()
        exact = self._resets or hwm > self._mark or not self.phases
        end = rss_mb()
        self.phases.append(Phase(name=self._name, peak_rss_mb=hwm if exact else None, rss_start_mb=self._rss_start, rss_end_mb=end, exact=exact))
        if self._resets:
            self._resets = reset_hwm()
        self._mark = max(self._mark, hwm) if not self._resets else 0.0

    @property
    def peak(self) -> tuple[float, str]:
        """(peak RSS in MB, the phase that set it) over the closed phases."""
        known = [p for p in self.phases if p.peak_rss_mb is not None]
        if not known:
            return hwm_mb(), self._name
        best = max(known, key=lambda p: p.peak_rss_mb)
        return best.peak_rss_mb, best.name

    def table(self) -> list[dict]:
        return [p.to_dict() for p in self.phases]

    def markdown(self) -> str:
        return phase_markdown(self.table())


def phase_markdown(rows: list[dict]) -> str:
    """The per-phase table of a report (``report.memory["phases"]``) as markdown."""

    def f(v):
        return "-" if v is None else f"{v:.0f}"

    lines = ["| phase | peak RSS (MB) | RSS at start (MB) | RSS at end (MB) |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['phase']} | {f(r['peak_rss_mb'])}{'' if r.get('exact', True) else ' (<= earlier peak)'} | {f(r['rss_start_mb'])} | {f(r['rss_end_mb'])} |"
        )
    return "\n".join(lines)
