"""Perplexity on several evaluation sources, one source's windows alive at a time.

``--eval-data wiki,news,FILE`` evaluates each source on its own test windows. The
windows of a source are built when needed (from the on-disk token cache after the first
time) and dropped when the next source's are built, so a run holds one source's windows
and token stream, never all of them; a single source is built once and kept, as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .perplexity import perplexity


class SourceWindows:
    """``windows(source)``: the test windows of ``source`` from ``build``, keeping only the last source's."""

    def __init__(self, build: Callable[[str], torch.Tensor], sources: tuple[str, ...]) -> None:
        self.build, self.sources = build, tuple(sources)
        self._source: str | None = None
        self._windows: torch.Tensor | None = None

    def __call__(self, source: str) -> torch.Tensor:
        if source != self._source:
            self._source, self._windows = None, None  # free the previous source's windows first
            self._windows, self._source = self.build(source), source
        return self._windows

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(windows, tokens per window) of every source; too little text in any source fails here."""
        return {s: tuple(int(d) for d in self(s).shape) for s in self.sources}

    def perplexities(self, model, *, batch_size: int, progress: bool, desc: str, measure=perplexity, kl=None) -> dict[str, float]:
        """{source: ``measure`` (:func:`llmpress.eval.perplexity.perplexity`) of ``model`` on its windows},
        in the order of the sources. ``kl(source)``: the recorder or comparer of baseline
        log-probabilities (:mod:`llmpress.eval.kl`) each source's measurement feeds."""
        several = len(self.sources) > 1
        extra = (lambda s: {"kl": kl(s)}) if kl is not None else (lambda s: {})
        return {s: measure(model, self(s), batch_size, progress, f"{desc} ({s})" if several else desc, **extra(s)) for s in self.sources}


def evaluation_record(evaluation: dict, shapes: dict[str, tuple[int, int]]) -> dict:
    """``report.evaluation``: the settings, the first source's window count and tokens scored
    (as before several sources existed) and ``windows_by_source``."""
    n, length = next(iter(shapes.values()))
    return {
        **evaluation,
        "windows": n,
        "tokens_scored": n * (length - 1),
        "windows_by_source": {s: w for s, (w, _) in shapes.items()},
    }


def set_ppl(figures: dict, by_source: dict[str, float]) -> None:
    """``ppl`` (the first source's, as before several sources existed) and ``ppl_by_source``."""
    figures["ppl"] = next(iter(by_source.values()))
    figures["ppl_by_source"] = by_source
