"""Second-order compression on SmolLM2-135M: RTN vs GPTQ (W4 g64, W3 g64) and SparseGPT
(50%, 2:4, 50% + W4 g64), perplexity and its ratio to full precision.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/second_order.py [--windows 64] [--only gptq-w4g64 ...]

128 calibration windows of 512 tokens (seed 0), 64 test windows of 512 tokens. Prints one
line per preset as it finishes (with the engine's time split: calibration forwards vs the
solver), then a markdown table; writes runs/bench/second_order.json.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_SOURCES, Bench, main_guard  # noqa: E402

PRESETS = ("rtn-w4g64", "gptq-w4g64", "rtn-w3g64", "gptq-w3g64", "sparsegpt-50", "sparsegpt-2of4", "sparsegpt-50-w4g64")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib", type=int, default=128, help="calibration windows of 512 tokens")
    ap.add_argument("--eval", default=EVAL_SOURCES, help="test texts, one column each (an --eval-data list)")
    ap.add_argument(
        "--fp-ppl", type=float, help="the first --eval source's full-precision ppl measured before on the same windows (skips that evaluation)"
    )
    ap.add_argument("--only", nargs="+", choices=PRESETS)
    ap.add_argument("--out", default="runs/bench/second_order.json")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    b = Bench(a.model, eval_windows=a.windows, calib_samples=a.calib, fp_ppl=a.fp_ppl, eval_sources=a.eval, out=a.out)
    for preset in a.only or PRESETS:
        row = b.run(preset, preset)
        sec = row.get("seconds", {})
        solve = sum(v for k, v in sec.items() if k.startswith("stage"))
        print(
            f"    time split: capture {sec.get('capture', 0):.1f}s, calibration forwards {sec.get('calibration_forward', 0):.1f}s, "
            f"solver {solve:.1f}s, total {sec.get('compress_total', 0):.1f}s",
            flush=True,
        )
    print()
    print(b.table())
    b.save(a.out)


if __name__ == "__main__":
    main_guard(main)
