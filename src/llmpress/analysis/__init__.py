"""Data-distribution analysis: massive activations, channel-wise outliers, LLM.int8()
outlier features, super weights, quantization difficulty, interventions, attention sinks, report.

``llmpress analyze MODEL`` runs :func:`run`; in Python::

    from llmpress.analysis import AnalysisConfig, analyze
    an = analyze(model, tokenizer, AnalysisConfig(windows=4))
    an.summary["massive"]["top"]

Detectors are pure functions in :mod:`llmpress.analysis.detect`. Heavy imports
(matplotlib) happen only when plots are drawn.
"""

from __future__ import annotations

from .detect import Thresholds


def __getattr__(name):  # lazy: importing the CLI must not pull in the whole pipeline
    if name in ("AnalysisConfig", "Analysis", "analyze", "run"):
        from . import pipeline as _a

        return getattr(_a, name)
    raise AttributeError(name)


__all__ = ["Thresholds", "AnalysisConfig", "Analysis", "analyze", "run"]
