"""Low rank on SmolLM2-135M (and gemma-3-270m): perplexity against the targeted linears'
parameter ratio, per method, on the three test texts.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/lowrank.py [--model smollm2-135m] [--ratios 0.9 0.8 0.7 0.6]
        [--methods svd asvd svd_llm] [--fp-ppl X]

Every Linear but lm_head factored at the same ratio (uniform ranks) and, unless --no-alloc,
with ranks allocated across layers under the same total budget (lowrank_alloc), 128 calibration windows of
512 tokens from the packaged Wikipedia training split, 64 test windows per text. Prints one line
per run, then a markdown table; writes runs/bench/lowrank-MODEL.json and a PNG plot of
perplexity (wiki) against the ratio per method (runs/bench/lowrank-MODEL.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_SOURCES, Bench, main_guard  # noqa: E402

from llmpress.recipe import stage  # noqa: E402

METHODS = ("svd", "asvd", "svd_llm")


def plot(rows: list[dict], fp: float, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        for ranks, ls in (("uniform", "-"), ("allocated", "--")):
            pts = sorted((r["param_ratio"], r["ppl"]) for r in rows if r.get("lowrank") == m and r.get("ranks") == ranks)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls=ls, label=f"{m} ({ranks})")
    ax.axhline(fp, color="gray", ls="--", label="fp32")
    ax.set_xlabel("parameters of the targeted linears (fraction kept)")
    ax.set_ylabel("perplexity (wiki, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"low rank on {model}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", default=EVAL_SOURCES)
    ap.add_argument("--fp-ppl", type=float)
    ap.add_argument("--no-alloc", action="store_true", help="uniform ranks only (no lowrank_alloc rows)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    b = Bench(a.model, eval_windows=a.windows, calib_samples=a.calib, fp_ppl=a.fp_ppl, eval_sources=a.eval)
    for ratio in a.ratios:
        for m in a.methods:
            st = stage(m, targets=["Linear"], ignore=["lm_head"], ratio=ratio)
            b.run(f"{m} ratio {ratio}", [st], lowrank=m, param_ratio=ratio, ranks="uniform")
            if not a.no_alloc:
                alloc = stage("lowrank_alloc", targets=["Linear"], ignore=["lm_head"], ratio=ratio)
                b.run(f"{m} ratio {ratio}, allocated ranks", [alloc, st], lowrank=m, param_ratio=ratio, ranks="allocated")
    out = Path(a.out or f"runs/bench/lowrank-{a.model}.json")
    b.save(str(out))
    plot(b.rows, b.fp_ppl, out.with_suffix(".png"), a.model)
    print(b.table())


if __name__ == "__main__":
    main_guard(main)
