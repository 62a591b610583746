"""Peak RSS per phase of `make demo` (`llmpress compress smollm2-135m --recipe rtn-w4g64 ...`).

    .venv/bin/python benchmarks/memory_phases.py [--caches cold,warm] [--recipe rtn-w4g64] [-- EXTRA CLI FLAGS]

Runs the demo command through the public CLI entry point (the ``llmpress`` console script,
one subprocess per run) and reads the per-phase peak RSS its JSON report records
(``report.memory.phases``: the kernel's high-water mark, reset at every phase boundary).
``cold``: a fresh, empty ``LLMPRESS_CACHE`` (the packaged GGUF is converted in the run, as
on a fresh machine); ``warm``: the same cache again (conversion and token cache done).
Beside the report's figures, the driver samples the child's VmRSS every 20 ms from
/proc as an independent lower bound of its peak.

Prints a markdown table and writes runs/bench/memory_phases.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PHASES = ["startup", "load", "eval_data", "baseline_eval", "compress", "compressed_eval", "save"]


def cli() -> list[str]:
    """The ``llmpress`` console script of this interpreter's environment (else the same entry
    point, llmpress.cli:main, through ``python -c``)."""
    script = Path(sys.executable).parent / "llmpress"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; from llmpress.cli import main; sys.exit(main())"]


def _sample_rss(pid: int, stop: threading.Event, out: list[float]) -> None:
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(path) as f:
                m = re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M)
            if m:
                out.append(int(m.group(1)) * 1024 / 1e6)
        except OSError:
            return
        stop.wait(0.02)


def run_once(label: str, cache: Path, out: Path, recipe: str, model: str, extra: list[str]) -> dict:
    js = out.with_suffix(".json")
    cmd = [*cli(), "compress", model, "--recipe", recipe, "--out", str(out), "--json", str(js), "--overwrite", *extra]
    env = {**os.environ, "LLMPRESS_CACHE": str(cache)}
    print(f"[{label}] LLMPRESS_CACHE={cache} {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    samples: list[float] = []
    stop = threading.Event()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = threading.Thread(target=_sample_rss, args=(proc.pid, stop, samples), daemon=True)
    sampler.start()
    log, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"[{label}] exit code {proc.returncode}:\n{log[-4000:]}")
    rep = json.loads(js.read_text())
    return {
        "label": label,
        "command": " ".join(cmd),
        "cache": str(cache),
        "wall_s": round(time.perf_counter() - t, 1),
        "peak_rss_mb": rep["peak_rss_mb"],
        "peak_rss_phase": rep.get("peak_rss_phase"),
        "sampled_max_rss_mb": round(max(samples), 1) if samples else None,
        "phases": rep.get("memory", {}).get("phases", []),
        "seconds": rep.get("seconds", {}),
        "ppl": [rep["baseline"].get("ppl"), rep["compressed"].get("ppl")],
        "checkpoint_bytes": rep["compressed"].get("checkpoint_bytes"),
    }


def markdown(runs: list[dict]) -> str:
    def cell(run, phase):
        row = next((p for p in run["phases"] if p["phase"] == phase), None)
        if row is None or row["peak_rss_mb"] is None:
            return "-"
        return f"**{row['peak_rss_mb']:.0f}**" if phase == run["peak_rss_phase"] else f"{row['peak_rss_mb']:.0f}"

    names = [p for p in PHASES if any(p in {q["phase"] for q in r["phases"]} for r in runs)]
    lines = ["peak RSS (MB) per phase; **bold**: the phase that set the process peak", ""]
    lines.append("| phase | " + " | ".join(f"{r['label']} cache" for r in runs) + " |")
    lines.append("|---|" + "---:|" * len(runs))
    for p in names:
        lines.append(f"| {p} | " + " | ".join(cell(r, p) for r in runs) + " |")
    lines.append("| **process peak** | " + " | ".join(f"{r['peak_rss_mb']:.0f} ({r['peak_rss_phase']})" for r in runs) + " |")
    lines.append(
        "| max VmRSS sampled by the driver | " + " | ".join(f"{r['sampled_max_rss_mb']:.0f}" if r["sampled_max_rss_mb"] else "-" for r in runs) + " |"
    )
    lines.append("| wall time (s) | " + " | ".join(f"{r['wall_s']:.0f}" for r in runs) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="rtn-w4g64")
    ap.add_argument("--caches", default="cold,warm", help="comma list of cold (fresh empty cache, then kept for warm) and warm")
    ap.add_argument("--cache", default=None, help="warm runs only: the cache to use (default: the cold run's, else LLMPRESS_CACHE)")
    ap.add_argument("--out", default="runs/bench/memory_phases")
    ap.add_argument("extra", nargs="*", help="flags passed to `llmpress compress` (after --)")
    a = ap.parse_args()
    kinds = [k.strip() for k in a.caches.split(",") if k.strip()]
    if not kinds or any(k not in ("cold", "warm") for k in kinds):
        raise SystemExit("--caches takes cold and/or warm")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix="llmpress-cold-cache-")) if "cold" in kinds else None
    default_warm = Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress"))
    runs = []
    try:
        for k in kinds:
            cache = fresh if k == "cold" else Path(a.cache) if a.cache else fresh or default_warm
            runs.append(run_once(k, cache, out.parent / f"{out.name}-{k}", a.recipe, a.model, a.extra))
            print(f"[{k}] peak RSS {runs[-1]['peak_rss_mb']:.0f} MB in {runs[-1]['peak_rss_phase']}", flush=True)
    finally:
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
    md = markdown(runs)
    print()
    print(md)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=2) + "\n")
    out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
