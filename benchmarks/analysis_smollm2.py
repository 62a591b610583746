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
from llmpress.analysis.report import console_summary, write_outputs


def markdown_table(rows: list[dict]) -> list[str]:
    """The intervention table as markdown: pooled perplexity and ratio, then one column per text."""
    texts = list(rows[0].get("ppl_by_source") or {})
    head = ["intervention", "ppl", "ratio", *[f"{t} ppl (x)" for t in texts], "top-1 next token", "p(top-1)", "p(original top-1)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per = [f"{r['ppl_by_source'][t]:.4g} ({r['ratio_by_source'][t]:.3g}x)" for t in texts]
        cells = [
            r["name"],
            f"{r['ppl']:.4g}",
            f"{r['ppl_ratio']:.3g}",
            *per,
            repr(r["top1"]),
            f"{r['top1_prob']:.3f}",
            f"{r.get('ref_prob', r['top1_prob']):.3f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


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
    for line in markdown_table(iv["rows"]):
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
