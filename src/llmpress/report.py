"""The compression report: one object, written as JSON and printed as a table."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .io_safety import file_mode, normalize_permissions, write_atomic  # noqa: F401 (re-exported)
from .shrink import in_force as _shrink_in_force


@dataclass(kw_only=True)
class Report:
    model: str
    recipe: dict
    baseline: dict = field(default_factory=dict)  # ppl, size_mb, bits_per_weight, n_params
    compressed: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_rss_phase: str | None = None  # the phase that set peak_rss_mb (see memory)
    peak_gpu_mb: float | None = None
    memory: dict = field(default_factory=dict)  # {"phases": [{phase, peak_rss_mb, ...}], "hwm_reset": bool}
    calibration: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    # the recipe's data-free counterpart on the same sources (eval/reference.py), when measured
    reference: dict | None = None
    layers: dict[str, dict] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)  # what model-scope stages reported (OWL's ratios), by stage
    environment: dict = field(default_factory=dict)
    test_shrink: dict | None = field(default_factory=_shrink_in_force)  # tests only: LLMPRESS_TEST_* in force
    # what compress() did, for save() and the exporters (llmpress.calib.plan.CompressResult); not in the JSON
    result: Any = field(default=None, repr=False, compare=False)

    @property
    def bits_per_weight(self) -> float | None:
        return self.compressed.get("bits_per_weight")

    @property
    def size_mb(self) -> float | None:
        return self.compressed.get("size_mb")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, result=None))
        del d["result"]
        d["bits_per_weight"] = self.bits_per_weight
        d["size_mb"] = self.size_mb
        bp, cp = self.baseline.get("ppl"), self.compressed.get("ppl")
        d["ppl_ratio"] = cp / bp if bp and cp else None
        bs, cs = self.baseline.get("ppl_by_source") or {}, self.compressed.get("ppl_by_source") or {}
        d["ppl_ratio_by_source"] = {s: cs[s] / bs[s] for s in bs if bs[s] and cs.get(s)}
        return d

    def ppl_rows(self) -> list[tuple[str, str, str]]:
        """The table's perplexity rows: one (``perplexity``) for one source; for several, one per
        source (``perplexity (news)``), the compressed cell carrying the ratio to the baseline."""
        base, comp = self.baseline.get("ppl_by_source") or {}, self.compressed.get("ppl_by_source") or {}
        sources = list(dict.fromkeys([*base, *comp]))
        if len(sources) < 2:
            return [("perplexity", _fmt(self.baseline.get("ppl"), ".3f"), _fmt(self.compressed.get("ppl"), ".3f"))]
        rows = []
        for s in sources:
            b, c = base.get(s), comp.get(s)
            ratio = f" ({c / b:.3f}x)" if b and c else ""
            rows.append((f"perplexity ({s})", _fmt(b, ".3f"), _fmt(c, ".3f") + ratio))
        ref = (self.reference or {}).get("ppl_by_source") or {}
        for s in sources:  # the data-free counterpart on the same windows (eval/reference.py)
            if ref.get(s) and base.get(s):
                rows.append((f"{self.reference['recipe']} ({s})", "", f"{ref[s]:.3f} ({ref[s] / base[s]:.3f}x)"))
        return rows

    def task_rows(self) -> list[tuple[str, str, str]]:
        """The table's downstream-task rows (:mod:`llmpress.eval.tasks`): one per task and
        metric, ``value ± standard error``, baseline and compressed."""
        base, comp = self.baseline.get("tasks") or {}, self.compressed.get("tasks") or {}
        rows = []
        for task in dict.fromkeys([*base, *comp]):
            b, c = base.get(task) or {}, comp.get(task) or {}
            n = c.get("samples", b.get("samples"))
            for m in dict.fromkeys([*b, *c]):
                if m != "samples" and not m.partition(",")[0].endswith("_stderr"):
                    rows.append((f"{task} {m}" + (f" ({n} docs)" if n is not None else ""), _task_cell(b, m), _task_cell(c, m)))
        return rows

    def task_table(self) -> str:
        """The task rows of a single model (``llmpress eval --tasks``): task, metric, value."""
        rows = [(label, c) for label, _, c in self.task_rows()]
        w = max((len(r[0]) for r in rows), default=0)
        return "\n".join(f"{label:<{w}}  {value}" for label, value in rows)

    def kl_rows(self) -> list[tuple[str, str, str]]:
        """The table's rows of agreement with the baseline (:mod:`llmpress.eval.kl`): KL divergence
        (mean and 99th percentile, nats per token) and top-1 agreement, per source when several."""
        kl, p99, top1 = (self.compressed.get(k) or {} for k in ("kl_by_source", "kl_p99_by_source", "top1_by_source"))
        rows = []
        for s in kl:
            where = f" ({s})" if len(kl) > 1 else ""
            if kl[s] is not None:
                rows.append((f"KL divergence, mean / p99{where}", "", f"{kl[s]:.4g} / {p99[s]:.4g}"))
                rows.append((f"top-1 agreement{where}", "", f"{100 * top1[s]:.2f}%"))
        return rows

    def generation_rows(self) -> list[tuple[str, str, str]]:
        """The table's row of greedy continuations (:mod:`llmpress.eval.generate`): prompts continued
        as the baseline does, and the mean share of tokens before the first difference."""
        g = self.compressed.get("generation_agreement")
        if not g:
            return []
        return [("greedy continuations as baseline's", "", f"{g['identical']}/{g['prompts']} (first {100 * g['common_prefix']:.0f}% of tokens)")]

    def set_memory(self, tracker) -> None:
        """Peak RSS, the phase that set it and the per-phase table of a
        :class:`llmpress.eval.memory.PhaseTracker`."""
        peak, phase = tracker.peak
        self.peak_rss_mb, self.peak_rss_phase = round(peak, 1), phase
        self.memory = {"phases": tracker.table(), "hwm_reset": all(p["exact"] for p in tracker.table())}

    def write_json(self, path: str | os.PathLike) -> None:
        write_atomic(Path(path), json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")

    def table(self) -> str:
        ppl_rows = self.ppl_rows()
        rows = [("", "baseline", "compressed"), *ppl_rows, *self.kl_rows(), *self.task_rows(), *self.generation_rows()]
        f = _fmt
        for key, label, fmt in (
            ("bits_per_weight", "bits per weight (linears)", ".3f"),
            ("size_mb", "size (MB, unquantized tensors at 16 bits)", ".1f"),
        ):
            rows.append((label, f(self.baseline.get(key), fmt), f(self.compressed.get(key), fmt)))
        disk = self.compressed.get("checkpoint_bytes")
        if disk is not None:
            rows.append(("checkpoint on disk (MB, real bytes)", "-", f(disk / 1e6, ".1f")))
        d = self.to_dict()
        if d["ppl_ratio"] and len(ppl_rows) == 1:  # several sources carry their ratios in their rows
            rows.append(("perplexity ratio", "1.000", f"{d['ppl_ratio']:.3f}"))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append("")
        lines.append("wall time per stage (s):")
        for k, v in self.seconds.items():
            lines.append(f"  {k:<28} {v:8.1f}")
        where = f" (in {self.peak_rss_phase})" if self.peak_rss_phase else ""
        lines.append(f"peak RSS: {self.peak_rss_mb:.0f} MB{where}" + (f", peak GPU: {self.peak_gpu_mb:.0f} MB" if self.peak_gpu_mb else ""))
        per_phase = [p for p in self.memory.get("phases", []) if p.get("peak_rss_mb") is not None]
        if per_phase:
            lines.append("peak RSS per phase (MB): " + ", ".join(f"{p['phase']} {p['peak_rss_mb']:.0f}" for p in per_phase))
        if self.test_shrink:
            lines.append("TEST SHRINK in force (figures are not the real model's): " + " ".join(f"{k}={v}" for k, v in self.test_shrink.items()))
        return "\n".join(lines)


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _task_cell(figures: dict, metric: str) -> str:
    """``value ± stderr`` of one task metric (``-`` when absent)."""
    v = figures.get(metric)
    if v is None:
        return "-"
    name, sep, filt = metric.partition(",")
    err = figures.get(f"{name}_stderr{sep}{filt}")
    return f"{v:.4g}" + (f" ± {err:.2g}" if err is not None else "")


def _jsonable(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Bytes on disk of every file in a saved checkpoint folder (what a user downloads)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
