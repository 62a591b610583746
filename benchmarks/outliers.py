"""Outlier-driven compression on SmolLM2-135M (and W8A8 on gemma-3-270m).

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/outliers.py \
        [--sections w8a8,awq,prune,llm_int8,outliers,osplus,gemma] [--calib 128] [--windows 64]

Settings as in /work/shared/ANCHORS.md: test split, 64 windows of 512 tokens, calibration
128 windows of 512 (seed 0), symmetric weights, group 64, every Linear but lm_head.
Sections:

- w8a8: RTN W8A8 vs SmoothQuant W8A8 (per-token dynamic activations, the presets), the
  same with per-tensor dynamic activations (where smoothing matters most), and the
  SmoothQuant model converted to Int8Linear (real integer GEMM) as a check;
- awq: RTN vs AWQ at W3 g64 (and W4 g64), GPTQ W3 vs AWQ+GPTQ W3 when GPTQ exists;
- prune: magnitude vs Wanda (sequential), 50% per row and 2:4;
- llm_int8: LLM.int8() perplexity and the share of outlier input columns per layer;
- outliers: RTN W3 g64 vs W3 g64 + 0.5% fp16 outliers, with honest bits per weight;
- osplus: SmoothQuant against Outlier Suppression+ (the same stage with ``shift: true``:
  each channel centred by its calibration midpoint, then scaled) at W8A8 (the
  ``smoothquant-w8a8`` preset) and W4A8 (the same with RTN W4 sym g64 weights, the
  alpha search scoring that W4A8 block), with RTN W4A8 (``rtn-w4a8``) for reference;
- gemma: gemma-3-270m W8A8 with and without SmoothQuant.

Rows are appended to runs/bench/outliers.json as they finish (a partial run keeps them).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_SOURCES, cells, eval_sets, score  # noqa: E402

from llmpress import api, models
from llmpress.calib.engine import EngineOptions
from llmpress.quant import QuantArgs
from llmpress.recipe import stage
from llmpress.registry import get_method

SECTIONS = ("w8a8", "awq", "prune", "llm_int8", "outliers", "osplus", "gemma")
W8 = QuantArgs(bits=8, granularity="channel")
A8T = QuantArgs(bits=8, granularity="tensor")


class Runner:
    def __init__(self, model_name: str, windows: int, calib: int, out: Path, sources: str = EVAL_SOURCES):
        self.name = model_name
        self.model, self.tok = models.load(model_name)
        self.sets = eval_sets(self.tok, self.model, sources, windows)
        self.windows = next(iter(self.sets.values()))
        self.sources = list(self.sets)
        self.calib_cfg = api.CalibConfig(n_samples=calib)
        self.calib = api.calibration_windows(self.tok, self.model, self.calib_cfg)
        self.out = out
        self.fp = None  # the first source's full-precision ppl
        self.fp_by: dict[str, float] = {}
        self.done: dict[str, dict] = {}
        self.extra = False
        self.resume = False
        self.match: list[str] = []

    def ppl(self, m, label) -> tuple[dict, float]:
        """Perplexity per evaluation source (``ppl`` in a row is the first source's)."""
        t = time.perf_counter()
        return score(m, self.sets), time.perf_counter() - t

    def _same(self, row: dict) -> bool:
        return row["model"] == self.name and row["eval_windows"] == int(self.windows.shape[0]) and row.get("sources", ["wiki"]) == self.sources

    def baseline(self) -> dict:
        if not self.fp_by and self.out.exists():  # measured by an earlier invocation (another section)
            for row in json.loads(self.out.read_text())["rows"]:
                if row["section"] == "baseline" and self._same(row):
                    self.fp_by = row.get("ppl_by_source", {self.sources[0]: row["ppl"]})
        if not self.fp_by:
            first = {self.sources[0]: self.fp} if self.fp is not None else {}  # --fp-ppl given
            rest = {s: w for s, w in self.sets.items() if s not in first}
            t = time.perf_counter()
            self.fp_by = {**first, **score(self.model, rest)}
            self.fp = self.fp_by[self.sources[0]]
            self.emit({"section": "baseline", "method": "full precision (fp32)", "ppl_by_source": self.fp_by, "bits_per_weight": 16.0,
                       "compress_s": 0.0, "eval_s": time.perf_counter() - t})  # fmt: skip
        self.fp = self.fp_by[self.sources[0]]
        return {"ppl": self.fp}

    def run(self, section: str, label: str, recipe, after=None, then=(), **extra) -> dict:
        """Compress a copy with ``recipe``, evaluate; ``then``: (label, fn(model, report) -> info)
        further conversions of the same compressed model, each evaluated as its own row."""
        if label in self.done:  # same recipe already measured in this run (another section)
            return self.done[label]
        if self.match and not any(m in label for m in self.match):
            return {}
        if self.resume and self.out.exists():  # measured by an earlier invocation with the same windows
            for row in json.loads(self.out.read_text())["rows"]:
                if self._same(row) and (row["method"], row["calib_windows"]) == (label, int(self.calib.shape[0])):
                    print(f"[{self.name}] {label}: measured before, kept (ppl {row['ppl']:.3f})", flush=True)
                    self.done[label] = row
                    return row
        self.baseline()
        m = copy.deepcopy(self.model)
        r = api._as_recipe(recipe)
        t = time.perf_counter()
        rep = api.compress(m, r, self.calib, engine=EngineOptions(batch_size=8, progress=False))
        cs = time.perf_counter() - t
        info = after(m, rep) if after else {}
        p, es = self.ppl(m, label)
        row = {
            "section": section,
            "method": label,
            "ppl_by_source": p,
            "bits_per_weight": rep.bits_per_weight,
            "compress_s": cs,
            "eval_s": es,
            "stage_seconds": rep.seconds,
            **extra,
            **info,
        }
        if after is not None and hasattr(after, "post"):
            row.update(after.post(m, rep))
        self.emit(row)
        self.done[label] = row
        for lab, fn in then:
            more = fn(m, rep)
            p, es = self.ppl(m, lab)
            self.emit({**row, "method": lab, "ppl_by_source": p, "eval_s": es, **more})
        del m
        return row

    def emit(self, row: dict) -> None:
        row = {
            "model": self.name,
            "eval_windows": int(self.windows.shape[0]),
            "calib_windows": int(self.calib.shape[0]),
            "sources": self.sources,
            **row,
        }
        row["ppl"] = row["ppl_by_source"][self.sources[0]]
        if self.fp_by:
            row["ratio"] = row["ppl"] / self.fp_by[self.sources[0]]
            row["ratio_by_source"] = {s: v / self.fp_by[s] for s, v in row["ppl_by_source"].items()}
        data = json.loads(self.out.read_text()) if self.out.exists() else {"rows": []}
        data["rows"].append(row)
        data["machine"] = platform.processor() or platform.machine()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(data, indent=2, default=str))
        shown = "  ".join(cells(row["ppl_by_source"], self.fp_by or {s: 1.0 for s in self.sources}))
        print(
            f"[{self.name}] {row['method']:<44} {shown}  bits {row['bits_per_weight']:6.3f}  compress {row['compress_s']:7.1f}s  eval {row['eval_s']:6.1f}s",
            flush=True,
        )


def _alpha_summary(rep) -> dict:
    alphas = [lr["smoothquant"]["alpha"] for n, lr in rep.layers.items() if n.endswith("q_proj") and "smoothquant" in lr]
    return {"alpha_per_block": alphas}


def w8a8(r: Runner) -> None:
    r.run("w8a8", "RTN W8A8 (per-token act)", "rtn-w8a8")

    def to_int8(m, rep):
        from llmpress.runtime.int8 import convert_to_int8

        return {"int8_linears": len(convert_to_int8(m, backend="fp32_exact", records=rep.result.records))}

    r.run(
        "w8a8",
        "SmoothQuant W8A8 (per-token act)",
        "smoothquant-w8a8",
        after=lambda m, rep: _alpha_summary(rep),
        then=[("SmoothQuant W8A8 as Int8Linear (integer GEMM)", to_int8)],
    )
    r.run("w8a8", "RTN W8A8 (per-tensor dynamic act)", [stage("rtn", weights=W8, activations=A8T)])
    r.run(
        "w8a8",
        "SmoothQuant W8A8 (per-tensor dynamic act)",
        [stage("smoothquant", activations=A8T), stage("rtn", weights=W8, activations=A8T)],
        after=lambda m, rep: _alpha_summary(rep),
    )


def awq(r: Runner) -> None:
    r.run("awq", "RTN W3 g64", "rtn-w3g64")
    r.run("awq", "AWQ W3 g64", "awq-w3g64")
    if r.extra:
        r.run("awq", "RTN W4 g64", "rtn-w4g64")
        r.run("awq", "AWQ W4 g64", "awq-w4g64")
    try:
        get_method("gptq")
    except Exception:
        print("GPTQ not available: skipping GPTQ rows", flush=True)
        return
    # both as the presets: full-range symmetric grid, activation order, static groups
    r.run("awq", "GPTQ W3 g64 (gptq-w3g64)", "gptq-w3g64")
    r.run("awq", "AWQ scales + GPTQ W3 g64 (awq-gptq-w3g64)", "awq-gptq-w3g64")
    if r.extra:
        rec = api._as_recipe("awq-gptq-w3g64")
        awq_st, gptq_st = rec.stages
        # AWQ's clip search is tuned for round-to-nearest; GPTQ rounds its own way
        clip = dataclasses.replace(awq_st, config=dataclasses.replace(awq_st.config, clip=True))
        r.run("awq", "AWQ scales + clip search + GPTQ W3 g64", [clip, gptq_st])
        # the field's damping (the presets' setting before issue 22's held-out rule)
        damp = dataclasses.replace(gptq_st, config=dataclasses.replace(gptq_st.config, damp=0.01))
        r.run("awq", "GPTQ W3 g64, damp 0.01 (the old gptq-w3g64)", [damp])
        r.run("awq", "AWQ scales + GPTQ W3 g64, damp 0.01 (the old awq-gptq-w3g64)", [awq_st, damp])


def prune(r: Runner) -> None:
    for label, preset in (
        ("magnitude 50% (per row)", "magnitude-50"),
        ("Wanda 50% (sequential)", "wanda-50"),
        ("magnitude 2:4", "magnitude-2of4"),
        ("Wanda 2:4 (sequential)", "wanda-2of4"),
    ):
        r.run("prune", label, preset)


def llm_int8(r: Runner) -> None:
    from llmpress.runtime.llm_int8 import llm_int8_stats

    class After:
        def __call__(self, m, rep):
            return {}

        def post(self, m, rep):
            st = llm_int8_stats(m)
            return {
                "outlier_share": {n: round(c["mean_outlier_share"], 5) for n, c in st.items()},
                "outlier_share_max": {n: round(c["max_outlier_share"], 5) for n, c in st.items()},
            }

    row = r.run("llm_int8", "LLM.int8() threshold 6 (eval batch 4x512)", "llm-int8", after=After())
    if row:
        print_shares(row["outlier_share"])
    if r.extra:  # what the int8 weights alone cost, and lower thresholds (more float columns)
        r.run("llm_int8", "RTN W8 per-channel, weights only (rtn-w8)", "rtn-w8")
        for t in (2.0, 1.0):
            row = r.run("llm_int8", f"LLM.int8() threshold {t:g} (eval batch 4x512)", [stage("llm_int8", threshold=t)], after=After())
            if row:
                print_shares(row["outlier_share"])


def print_shares(share: dict) -> None:
    kinds = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    print("share of outlier input columns per call (mean over eval batches), q/k/v share one input, gate/up share one input")
    print("| layer | " + " | ".join(k.split(".")[-1].replace("q_proj", "q/k/v").replace("gate_proj", "gate/up") for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    layers = sorted({int(n.split(".")[2]) for n in share})
    for i in layers:
        cells = [f"{100 * share.get(f'model.layers.{i}.{k}', float('nan')):.2f}%" for k in kinds]
        print(f"| {i} | " + " | ".join(cells) + " |")


def outliers(r: Runner) -> None:
    r.run("outliers", "RTN W3 g64", "rtn-w3g64")
    r.run("outliers", "RTN W3 g64 + 0.5% fp16 outliers (CSR)", "w3g64-outliers0.5")
    r.run(
        "outliers",
        "RTN W3 g64 + 0.5% outliers, |w|*||x|| score",
        [stage("outliers", weights=QuantArgs(bits=3, group_size=64), fraction=0.005, score="activation")],
    )


def _smooth_recipe(weights: QuantArgs | None = None, shift: bool = False):
    """The smoothquant-w8a8 preset, optionally with other weights (search and RTN) and the OS+ shift."""
    rec = api._as_recipe("smoothquant-w8a8")
    sq, rtn = rec.stages
    w = weights or sq.config.weights
    return [
        dataclasses.replace(sq, config=dataclasses.replace(sq.config, weights=w, shift=shift)),
        dataclasses.replace(rtn, config=dataclasses.replace(rtn.config, weights=w)),
    ]


def osplus(r: Runner) -> None:
    w4 = QuantArgs(bits=4, group_size=64)
    r.run("osplus", "SmoothQuant W8A8 (per-token act)", "smoothquant-w8a8", after=lambda m, rep: _alpha_summary(rep))
    r.run("osplus", "OS+ (shift + scale) W8A8 (per-token act)", _smooth_recipe(shift=True), after=lambda m, rep: _alpha_summary(rep))
    r.run("osplus", "RTN W4 g64 A8 (per-token act, rtn-w4a8)", "rtn-w4a8")
    r.run("osplus", "SmoothQuant W4 g64 A8 (per-token act)", _smooth_recipe(w4), after=lambda m, rep: _alpha_summary(rep))
    r.run("osplus", "OS+ (shift + scale) W4 g64 A8 (per-token act)", _smooth_recipe(w4, shift=True), after=lambda m, rep: _alpha_summary(rep))


def gemma(r: Runner) -> None:
    r.run("gemma", "RTN W8A8 (per-token act)", "rtn-w8a8")
    r.run("gemma", "SmoothQuant W8A8 (per-token act)", "smoothquant-w8a8", after=lambda m, rep: _alpha_summary(rep))
    r.run("gemma", "RTN W8A8 (per-tensor dynamic act)", [stage("rtn", weights=W8, activations=A8T)])
    r.run(
        "gemma",
        "SmoothQuant W8A8 (per-tensor dynamic act)",
        [stage("smoothquant", activations=A8T), stage("rtn", weights=W8, activations=A8T)],
        after=lambda m, rep: _alpha_summary(rep),
    )


def table(path: Path) -> str:
    """Rows of the JSON, one column per evaluation source ('-' where a row, e.g. one from a run
    before the news and code columns existed, lacks the source)."""
    rows = json.loads(path.read_text())["rows"]
    sources = list(dict.fromkeys(s for x in rows for s in x.get("sources", ["wiki"])))
    lines = ["| model | section | method | " + " | ".join(f"{s} ppl (x fp)" for s in sources) + " | bits/weight | compress s |",
             "|---|---|---|" + "---|" * (len(sources) + 2)]  # fmt: skip
    for x in rows:
        ppl = x.get("ppl_by_source", {"wiki": x["ppl"]})
        ratio = x.get("ratio_by_source", {"wiki": x.get("ratio", float("nan"))})
        shown = [f"{ppl[s]:.3f} ({ratio.get(s, float('nan')):.3f}x)" if s in ppl else "-" for s in sources]
        lines.append(
            f"| {x['model']} | {x['section']} | {x['method']} | " + " | ".join(shown) + f" | {x['bits_per_weight']:.3f} | {x['compress_s']:.1f} |"
        )
    return "\n".join(lines)


# README labels of the rows (JSON label -> README label); rows not named here keep their label
README_LABELS = {
    "RTN W3 g64": "RTN W3 g64 (`rtn-w3g64`)",
    "AWQ W3 g64": "AWQ W3 g64 (`awq-w3g64`)",
    "RTN W4 g64": "RTN W4 g64 (`rtn-w4g64`)",
    "AWQ W4 g64": "AWQ W4 g64 (`awq-w4g64`)",
    "GPTQ W3 g64 (gptq-w3g64)": "GPTQ W3 g64 (`gptq-w3g64`)",
    "AWQ scales + GPTQ W3 g64 (awq-gptq-w3g64)": "**AWQ scales + GPTQ W3 g64 (`awq-gptq-w3g64`)**",
    "RTN W8A8 (per-token act)": "RTN W8A8, per-token int8 activations (`rtn-w8a8`)",
    "SmoothQuant W8A8 (per-token act)": "**SmoothQuant W8A8, alpha searched per block (`smoothquant-w8a8`)**",
    "SmoothQuant W8A8 as Int8Linear (integer GEMM)": "the same model as `Int8Linear` (integer GEMM, exact)",
    "RTN W8A8 (per-tensor dynamic act)": "RTN W8A8, per-tensor dynamic activations",
    "SmoothQuant W8A8 (per-tensor dynamic act)": "SmoothQuant W8A8, per-tensor dynamic activations",
    "OS+ (shift + scale) W8A8 (per-token act)": "OS+ W8A8: SmoothQuant with `shift: true` (channel midpoint shift, then scales)",
    "RTN W4 g64 A8 (per-token act, rtn-w4a8)": "RTN W4 g64 A8, per-token int8 activations (`rtn-w4a8`)",
    "SmoothQuant W4 g64 A8 (per-token act)": "SmoothQuant W4 g64 A8 (alpha searched on the W4A8 block)",
    "OS+ (shift + scale) W4 g64 A8 (per-token act)": "OS+ W4 g64 A8",
    "RTN W3 g64 + 0.5% fp16 outliers (CSR)": "RTN W3 g64 + 0.5% fp16 outliers (CSR, `w3g64-outliers0.5`)",
    "RTN W3 g64 + 0.5% outliers, |w|*||x|| score": "RTN W3 g64 + 0.5% outliers chosen by `|w| ||x||` instead of the error score",
    "LLM.int8() threshold 6 (eval batch 4x512)": "LLM.int8() (`llm-int8`: threshold 6, fp32 outlier columns, int8 rest)",
    "RTN W8 per-channel, weights only (rtn-w8)": "RTN W8 per-channel weights only (`rtn-w8`: LLM.int8()'s weights alone)",
    "LLM.int8() threshold 2 (eval batch 4x512)": "LLM.int8() threshold 2",
    "LLM.int8() threshold 1 (eval batch 4x512)": "LLM.int8() threshold 1",
    "magnitude 50% (per row)": "magnitude 50% per row (`magnitude-50`)",
    "Wanda 50% (sequential)": "Wanda 50%, sequential (`wanda-50`)",
    "magnitude 2:4": "magnitude 2:4 (`magnitude-2of4`)",
    "Wanda 2:4 (sequential)": "Wanda 2:4, sequential (`wanda-2of4`)",
}


def readme_table(path: Path, model: str = "smollm2-135m", sections=None) -> str:
    """The README's three-text table of one model's rows (in run order, each label once: the
    first row with it), ``sections`` to keep only those, with bits per weight."""
    rows = [x for x in json.loads(path.read_text())["rows"] if x["model"] == model]
    base = next(x for x in rows if x["section"] == "baseline")
    fp = base["ppl_by_source"]
    lines = ["| method | " + " | ".join(fp) + " | bits/weight |", "|---|" + "---|" * (len(fp) + 1)]
    lines.append("| full precision (fp32) | " + " | ".join(f"{v:.3f}" for v in fp.values()) + " | 16 |")
    seen = set()
    for x in rows:
        if x["section"] == "baseline" or x["method"] in seen or (sections and x["section"] not in sections):
            continue
        seen.add(x["method"])
        lines.append(
            f"| {README_LABELS.get(x['method'], x['method'])} | " + " | ".join(cells(x["ppl_by_source"], fp)) + f" | {x['bits_per_weight']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--out", default="runs/bench/outliers.json")
    ap.add_argument(
        "--extra",
        action="store_true",
        help="also W4 g64 rows (RTN, AWQ), AWQ without clip + GPTQ, the LLM.int8() threshold sweep, RTN W8 weight-only",
    )
    ap.add_argument("--match", action="append", default=[], help="only rows whose label contains this text (repeatable)")
    ap.add_argument("--resume", action="store_true", help="keep rows already in --out for the same model, windows and calibration count")
    ap.add_argument("--eval", default=EVAL_SOURCES, help="test texts, one column each (an --eval-data list)")
    ap.add_argument(
        "--fp-ppl",
        type=float,
        help="SmolLM2's full-precision perplexity on the first --eval source measured before on the same windows (skips that evaluation)",
    )
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--readme", metavar="MODEL", help="with --table: the README's table of MODEL's rows (e.g. smollm2-135m)")
    a = ap.parse_args()
    out = Path(a.out)
    if a.table:
        secs = [s for s in a.sections.split(",") if s] if a.sections != ",".join(SECTIONS) else None
        print(readme_table(out, a.readme, secs) if a.readme else table(out))
        return
    secs = [s for s in a.sections.split(",") if s]
    bad = [s for s in secs if s not in SECTIONS]
    if bad:
        sys.exit(f"unknown section(s) {bad}; choose from {SECTIONS}")
    torch.manual_seed(0)
    smol = [s for s in secs if s != "gemma"]
    if smol:
        r = Runner("smollm2-135m", a.windows, a.calib, out, a.eval)
        r.extra, r.resume, r.match = a.extra, a.resume, a.match
        r.fp = a.fp_ppl
        r.baseline()
        for s in smol:
            globals()[s](r)
        del r
    if "gemma" in secs:
        r = Runner("gemma3-270m", a.windows, a.calib, out, a.eval)
        r.resume, r.match = a.resume, a.match
        r.baseline()
        gemma(r)
    print()
    print(table(out))


if __name__ == "__main__":
    main()
