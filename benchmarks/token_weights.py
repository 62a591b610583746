"""How much of each linear's input energy the loss sees (issue 19, ``plan-bits --weighting
fisher-token``): per block linear, ``tr(H_a) / tr(H)`` with ``H = 2/n sum_t x_t x_t^T`` and
``H_a = 2/n sum_t a_t x_t x_t^T``, ``a_t`` the token's share of the squared loss gradient at the
linear's output (mean 1 over the tokens). 1: the tokens that carry the input energy carry
their share of the gradient, and the channel-only Fisher weighting is right; far below 1: the
energetic tokens are ones the loss hardly sees (gemma's post-MLP norm divides a token's
down_proj output by its own scale), and a cost without the token weights overstates that
linear's error.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/token_weights.py [--model gemma3-270m] [--windows 4]

Through the functions ``plan-bits`` runs (``calib.sensitivity.collect_sensitivity``,
``calib.dense.dense_blocks``) on the first calibration windows (Wikipedia, 512 tokens, seed 0).
Prints, per linear kind, the ratio per block, and writes runs/bench/token-weights-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import main_guard, results_path  # noqa: E402


def ratios(model_name: str, windows: int) -> dict[str, float]:
    """linear name -> tr(H_a) / tr(H) on ``windows`` calibration windows."""
    from llmpress import api, models
    from llmpress.bitplan import planned_linears
    from llmpress.calib.dense import dense_blocks
    from llmpress.calib.sensitivity import collect_sensitivity
    from llmpress.recipe import load_recipe

    model, tok = models.load(model_name)
    data = api.calibration_windows(tok, model, api.CalibConfig(n_samples=windows, seqlen=512, seed=0))
    names = planned_linears(model, load_recipe("gptq-w4g64"))
    _, tokens = collect_sensitivity(model, names, data, per_token=True)
    out = {}
    for blk in dense_blocks(model, names, data, batch_size=2, token_weights=tokens):
        for n, H in blk.hessians.items():
            out[n] = float(blk.cost_hessians[n].diagonal().sum() / H.diagonal().sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--windows", type=int, default=4, help="calibration windows of 512 tokens")
    ap.add_argument("--out", default=None, help="JSON (default runs/bench/token-weights-MODEL.json)")
    a = ap.parse_args()
    r = ratios(a.model, a.windows)
    kinds: dict[str, list[float]] = {}
    for n, v in r.items():
        kinds.setdefault(n.rsplit(".", 1)[-1], []).append(v)
    print(f"tr(H_a)/tr(H) per block, {a.model}, {a.windows} windows")
    print("| linear | min | median | max | per block |\n|---|---:|---:|---:|---|")
    for k, v in kinds.items():
        s = sorted(v)
        print(f"| {k} | {s[0]:.2f} | {s[len(s) // 2]:.2f} | {s[-1]:.2f} | {' '.join(f'{x:.2f}' for x in v)} |")
    path = results_path(a.out, "token-weights", a.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": a.model, "windows": a.windows, "ratio": r}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main_guard(main)
