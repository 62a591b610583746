"""RTN baselines on SmolLM2-135M: full precision, W8 per-channel, W4 g64, W3 g64 (min-max and MSE),
and the sign grids: ternary and binary, per channel and per group of 64.

    .venv/bin/python benchmarks/rtn_baselines.py [--windows 64] [--rows int|sign|all] [--fp-ppl 22.599]

Prints a markdown table (the README's foundation table) and writes runs/bench/rtn_baselines.json
(runs/bench/rtn_baselines-sign.json for ``--rows sign``). Each row is compressed with
``llmpress.compress`` and scored on the same test windows; rows named like a preset are
that preset from `llmpress recipes`.

Sign grids (src/llmpress/quant/core.py): ternary Q(w) = alpha*sign(w) where |w| > 0.7*mean|w|,
else 0, alpha = mean |w| over the kept entries; binary Q(w) = alpha*sign(w), alpha = ||w||_1/n;
the statistics per output row (presets ``ternary``, ``binary``) or per 64 input columns of a
row (the g64 rows: no preset, they measure no better than per row). Bits: 2 (ternary) or 1
(binary) per weight plus a 16-bit alpha per row or per group.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_SOURCES, Bench  # noqa: E402

from llmpress import QuantArgs, stage  # noqa: E402


def _sign_g64(kind: str):
    return [stage("rtn", weights=QuantArgs(kind=kind, granularity="group", group_size=64))]


ROWS = {  # label -> recipe (a preset name, or stages)
    "int": {p: p for p in ("rtn-w8", "rtn-w4g64", "rtn-w4g64-mse", "rtn-w3g64", "rtn-w8a8", "rtn-w4g32-asym")},
    "sign": {"ternary": "ternary", "ternary g64": _sign_g64("ternary"), "binary": "binary", "binary g64": _sign_g64("binary")},
}


def weight_errors(model) -> dict[str, float]:
    """Mean over the Linear layers (lm_head excluded) of ||Q(W) - W|| / ||W|| per grid: what
    each sign grid loses before any activation passes through it (int4/int3 g64 for scale)."""
    import torch

    from llmpress.quant import fake_quantize

    grids = {
        "ternary": QuantArgs(kind="ternary", granularity="channel"), "ternary g64": QuantArgs(kind="ternary", granularity="group", group_size=64),
        "binary": QuantArgs(kind="binary", granularity="channel"), "binary g64": QuantArgs(kind="binary", granularity="group", group_size=64),
        "int4 g64": QuantArgs(bits=4, group_size=64), "int3 g64": QuantArgs(bits=3, group_size=64),
    }  # fmt: skip
    linears = [m.weight.data for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return {k: sum(float((fake_quantize(w, a) - w).norm() / w.norm()) for w in linears) / len(linears) for k, a in grids.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--rows", choices=(*ROWS, "all"), default="int", help="int: the integer RTN presets; sign: ternary and binary; all: both")
    ap.add_argument("--eval", default=EVAL_SOURCES, help="test texts, one column each (an --eval-data list)")
    ap.add_argument(
        "--fp-ppl", type=float, help="the first --eval source's full-precision perplexity measured before on the same windows (skips that evaluation)"
    )
    a = ap.parse_args()
    out = "runs/bench/rtn_baselines.json" if a.rows == "int" else f"runs/bench/rtn_baselines-{a.rows}.json"
    b = Bench(a.model, eval_windows=a.windows, fp_ppl=a.fp_ppl, eval_sources=a.eval, out=out)
    rows = {**ROWS["int"], **ROWS["sign"]} if a.rows == "all" else ROWS[a.rows]
    for label, recipe in rows.items():
        b.run(label, recipe)
    print()
    print(b.table())
    if a.rows != "int":
        errs = weight_errors(b.model)
        print("\nrelative weight error ||Q(W) - W|| / ||W||, mean over the linears:")
        print("\n".join(f"  {k:<12} {v:.3f}" for k, v in errs.items()))
        b.rows.append({"method": "relative weight error", **errs})
    b.save(out)


if __name__ == "__main__":
    main()
