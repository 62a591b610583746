"""Progress on the console for every long step: one facility, one switch.

Every long loop in llmpress (the engine's blocks, perplexity, SpinQuant's optimization,
DuQuant's search, AWQ's grid, the first-use kernel build) reports through this module:

- ``bar(total, desc, unit)``: a progress bar (a context manager); ``Bar.update(n, info=...)``
  advances it, ``info`` is a short status shown after the count (``loss 3.21``);
  ``track(iterable, desc, unit)`` wraps an iterable in one.
- ``note(message)``: a one-line notice (``building llmpress CPU kernels ...``).
- ``scope(enabled)``: the switch. A context variable, set for the dynamic extent of a
  ``with`` block (``compress``, the engine, the CLI set it from ``EngineOptions.progress``
  / ``--no-progress``); it is reset on exit, so nothing leaks from one call to the next,
  and silence wins: ``scope(True)`` inside ``scope(False)`` stays silent. Outside any
  scope progress is on.

Where the output goes: stderr. On a terminal, tqdm bars (a bar opened while another is
open is a transient line under it). Anywhere else (CI logs, ``> log 2>&1``) no ``\\r``
redraws: a bar prints plain lines at 0%, 25%, 50%, 75% and 100%, plus a heartbeat line when
``HEARTBEAT_S`` seconds passed without one; a nested bar prints nothing of its own and
appears as a suffix of its parent's lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator

HEARTBEAT_S = 30.0  # plain (non-terminal) output: at most this long without a line
MILESTONES = (0, 25, 50, 75, 100)  # percent at which a plain bar prints a line

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("llmpress_progress", default=True)
_local = threading.local()  # the stack of open bars of this thread


def enabled() -> bool:
    """Whether progress is shown here (the innermost ``scope``; on outside any)."""
    return _enabled.get()


@contextlib.contextmanager
def scope(on: bool | None):
    """Show progress inside this block only if ``on`` (None: inherit). Silence wins."""
    token = _enabled.set(_enabled.get() and on is not False)
    try:
        yield
    finally:
        _enabled.reset(token)


def _stream():
    return sys.stderr  # looked up per call: pytest's capture and redirections replace it


def is_terminal(stream=None) -> bool:
    """A terminal that can draw a bar (a pseudo-terminal without a size, as some CI runners
    allocate, gets plain lines: tqdm would draw nothing at width 0)."""
    stream = stream or _stream()
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):  # no descriptor: trust isatty
        return True


def _stack() -> list[Bar]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


_notes = logging.getLogger(__name__)  # llmpress.progress: one-line notices of long steps (INFO)


def _write(line: str) -> None:
    """One line on the progress stream, above an open terminal bar if there is one."""
    stream = _stream()
    if is_terminal(stream) and _stack():
        from tqdm.auto import tqdm

        tqdm.write(line, file=stream)
    else:
        stream.write(line + "\n")
        stream.flush()


class _NoteHandler(logging.Handler):
    """Shows ``llmpress.progress`` notes as bare lines on the progress stream (see :func:`show_notes`)."""

    def emit(self, record: logging.LogRecord) -> None:
        _write(self.format(record))


def note(message: str) -> None:
    """A one-line notice for the user while progress is on, logged at INFO on
    ``llmpress.progress``: the library never prints it itself; the command line shows it
    (:func:`show_notes`), a Python user through their own logging configuration."""
    if enabled():
        _notes.info(message)


@contextlib.contextmanager
def show_notes() -> Iterator[None]:
    """Within the block, show ``llmpress.progress`` notes as bare lines on the progress stream
    (what the command line does; nests). They do not propagate meanwhile, so ``-v`` does not
    print them twice; the logger is restored on exit, so a caller that runs the command line
    in-process (tests, notebooks) is left as it was."""
    saved = list(_notes.handlers), _notes.level, _notes.propagate
    if not any(isinstance(h, _NoteHandler) for h in _notes.handlers):
        _notes.addHandler(_NoteHandler())
    _notes.setLevel(logging.INFO)
    _notes.propagate = False
    try:
        yield
    finally:
        _notes.handlers[:] = saved[0]
        _notes.setLevel(saved[1])
        _notes.propagate = saved[2]


class Bar:
    """One long step: ``total`` units (None: unknown). Use as a context manager, or call
    :meth:`close`. A disabled bar (progress off) does nothing."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, on: bool | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.info = ""
        self.active = enabled() and on is not False and total != 0  # nothing to do: no bar
        self.closed = False
        self._tqdm = None
        if not self.active:
            return
        stack = _stack()
        self.parent = stack[-1] if stack else None
        stack.append(self)
        self.t0 = self._last = time.monotonic()
        self._printed: set[int] = set()
        stream = _stream()
        if is_terminal(stream):
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit=unit, file=stream, leave=self.parent is None, dynamic_ncols=True)
        elif self.parent is None:
            self._milestone()

    # ----------------------------------------------------------------- updates
    def update(self, n: int = 1, info: str | None = None) -> None:
        """Advance by ``n`` units; ``info`` replaces the status text."""
        if not self.active or self.closed:
            return
        self.n += n
        if info is not None:
            self.info = info
        if self._tqdm is not None:
            if info is not None:
                self._tqdm.set_postfix_str(info, refresh=False)
            self._tqdm.update(n)
        else:
            self._plain_tick()

    def set_info(self, info: str) -> None:
        """Replace the status text without advancing."""
        self.update(0, info)

    def close(self, finished: bool = True) -> None:
        """End the bar; a plain bar prints its 100% line unless ``finished`` is False (an error)."""
        if not self.active or self.closed:
            return
        self.closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.parent is None and finished and 100 not in self._printed:
            self._line(100 if self.total else None, final=True)
        stack = _stack()
        if self in stack:
            stack.remove(self)
        if self.parent is not None and self._tqdm is None:
            self.parent._plain_tick()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.close(finished=exc_type is None)

    # ----------------------------------------------------------------- plain output
    def _pct(self) -> int | None:
        if not self.total:
            return None
        return min(100, int(100 * self.n / self.total))

    def _status(self) -> str:
        """``desc 3/8 info`` (a nested bar's part of its root's line)."""
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        return " ".join(x for x in (self.desc, count, self.info) if x)

    def _plain_tick(self) -> None:
        root = self
        while root.parent is not None:
            root = root.parent
        if root is self and self._milestone():
            return
        if root.active and not root.closed and time.monotonic() - root._last >= HEARTBEAT_S:
            root._line(root._pct())

    def _milestone(self) -> bool:
        """Print a line if a new milestone (0, 25, .. %) was reached; whether it did."""
        pct = self._pct()
        if pct is None:
            if self.n == 0 and not self._printed:
                self._line(None, mark=0)
                return True
            return False
        reached = [m for m in MILESTONES if m <= pct and m not in self._printed]
        if reached:
            self._line(pct, mark=max(reached))
            self._printed.update(reached)
        return bool(reached)

    def _line(self, pct: int | None, mark: int | None = None, final: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self.t0
        parts = [f"{self.desc}:"]
        if self.total:
            parts.append(f"{pct if pct is not None else 0:3d}% {self.n}/{self.total} {self.unit}")
        else:
            parts.append(f"{self.n} {self.unit}")
        timing = _fmt_seconds(elapsed)
        if self.total and 0 < self.n < self.total and not final:
            timing += f", eta {_fmt_seconds(elapsed * (self.total - self.n) / self.n)}"
        parts.append(f"[{timing}]")
        if self.info:
            parts.append(self.info)
        nested = [b._status() for b in _stack() if b is not self and _root_of(b) is self]
        if nested:
            parts.append("| " + " | ".join(nested))
        if final:
            parts.append("done")
        _write(" ".join(parts))
        self._last = now
        if mark is not None:
            self._printed.add(mark)
        if final and self.total:
            self._printed.add(100)


def _root_of(bar: Bar) -> Bar:
    while bar.parent is not None:
        bar = bar.parent
    return bar


def bar(total: int | None, desc: str, unit: str = "it", *, on: bool | None = None) -> Bar:
    """A progress bar for ``total`` units of the step ``desc`` (``on=False``: a silent one)."""
    return Bar(total, desc, unit, on=on)


def track(iterable: Iterable, desc: str, unit: str = "it", *, total: int | None = None, on: bool | None = None) -> Iterator:
    """Iterate over ``iterable`` with a bar (``total`` default: ``len(iterable)`` if known)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    b = Bar(total, desc, unit, on=on)
    finished = False
    try:
        for item in iterable:
            yield item
            b.update(1)
        finished = True
    finally:
        b.close(finished=finished)
