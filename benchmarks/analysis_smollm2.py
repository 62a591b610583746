"""Outlier analysis of SmolLM2-135M (or another model): findings and the intervention table.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/analysis_smollm2.py [--windows 8] [--seqlen 512] [--data wiki,news,code]

`--data` with several texts shares the windows among them (the findings pool them) and gives
each intervention a perplexity per text beside the pooled one.

Runs `llmpress.analysis.analyze` (massive activations, channel-wise outliers, LLM.int8()
features, super weights, difficulty, interventions), writes the HTML report and JSON to
runs/analysis-<model>/, prints the findings and the intervention table as markdown, and
saves the table to runs/bench/analysis_<model>.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from llmpress import models
from llmpress.analysis import AnalysisConfig, analyze
from llmpress.analysis.report import console_summary, intervention_table, write_outputs


def markdown_table(summary: dict) -> list[str]:
    """The report's intervention table (pooled perplexity and ratio, one column per text) as markdown."""
    tab = intervention_table(summary)
    return ["| " + " | ".join(tab[0]) + " |", "|" + "---|" * len(tab[0])] + ["| " + " | ".join(r) + " |" for r in tab[1:]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--random-seeds", type=int, default=2)
    ap.add_argument("--data", default="wiki", help="text(s), as `llmpress analyze --data`: wiki, news, code, a file, or a comma list")
    ap.add_argument("--out", help="report folder (default runs/analysis-<model>)")
    a = ap.parse_args()
    t = time.perf_counter()
    model, tok = models.load(a.model)
    an = analyze(model, tok, AnalysisConfig(windows=a.windows, seqlen=a.seqlen, random_seeds=a.random_seeds, source=a.data))
    an.summary["model"] = a.model
    out = Path(a.out or f"runs/analysis-{a.model}")
    write_outputs(an, out)
    wall = time.perf_counter() - t
    s = an.summary
    print()
    print(console_summary(an))
    iv = s["interventions"]
    print()
    print(f"model {a.model}, {s['windows']} test windows of {s['seqlen']} tokens; prompt {iv['prompt']!r}; total {wall:.0f} s")
    print()
    for line in markdown_table(s):
        print(line)
    bench = Path(f"runs/bench/analysis_{a.model}.json")
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text(
        json.dumps(
            {
                "model": a.model,
                "windows": s["windows"],
                "seqlen": s["seqlen"],
                "windows_by_source": s.get("windows_by_source"),
                "wall_s": wall,
                "seconds": s["seconds"],
                "massive_top": s["massive"]["top"],
                "next_channels": s["massive"]["next_channels"],
                "super_weights": s["super_weights"]["super_weights"],
                "interventions": iv,
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nreport: {out / 'report.html'}\ntable: {bench}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
