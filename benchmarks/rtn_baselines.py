"""RTN baselines on SmolLM2-135M: full precision, W8 per-channel, W4 g64, W3 g64 (min-max and MSE).

    .venv/bin/python benchmarks/rtn_baselines.py [--windows 64]

Prints a markdown table (the README's foundation table) and writes runs/bench/rtn_baselines.json.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    a = ap.parse_args()
    b = Bench(a.model, eval_windows=a.windows)
    for preset in ("rtn-w8", "rtn-w4g64", "rtn-w4g64-mse", "rtn-w3g64", "rtn-w8a8", "rtn-w4g32-asym"):
        b.run(preset, preset)
    print()
    print(b.table())
    b.save("runs/bench/rtn_baselines.json")


if __name__ == "__main__":
    main()
