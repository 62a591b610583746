"""Learned rounding on synthetic layer-wise problems (no model): the layer error
tr(dW H dW^T) of AdaRound, AdaRound with learned scales (AdaQuant) and GPTQ, as a ratio to
nearest rounding on the same grid; and the time of one AdaRound step on random layers of
SmolLM2-135M's shapes (one decoder block's seven linears).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learned_layers.py [--seeds 4] [--iters 100]

Problems: W [32, 64] standard normal; inputs X [512, 64] mixed by a random matrix (columns
correlate) and scaled per channel over a decade (the generator of tests/obs_problems.py).
"""

import argparse
import time

import torch

from llmpress.quant import QuantArgs, quantize_weight
from llmpress.quant.adaround_core import AdaRoundOptions, adaround_quantize
from llmpress.quant.gptq_solve import gptq_quantize
from llmpress.quant.hessian import layer_error

SMOLLM2_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def problem(seed: int, rows: int = 32, cols: int = 64, n: int = 512, spread: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.logspace(-1, 1, cols).pow(torch.log10(torch.tensor(spread)))[torch.randperm(cols, generator=g)]
    X = (torch.randn(n, cols, generator=g) @ mix) * scale
    return torch.randn(rows, cols, generator=g), 2.0 / n * X.T @ X


def quality(seeds: int, iters: int) -> list[str]:
    rows = ["| grid | AdaRound | AdaRound + learned scales | GPTQ (act order, damp 0.01) |", "|---|---|---|---|"]
    for args in (QuantArgs(bits=4, group_size=16), QuantArgs(bits=3, group_size=16), QuantArgs(bits=2, group_size=16)):
        r = {"ada": [], "scale": [], "gptq": []}
        for seed in range(seeds):
            W, H = problem(seed)
            rtn = layer_error(W, quantize_weight(W, args)[0], H)
            r["ada"].append(adaround_quantize(W, H, args, options=AdaRoundOptions(iters=iters)).error / rtn)
            r["scale"].append(adaround_quantize(W, H, args, options=AdaRoundOptions(iters=iters, learn_scale=True, scale_lr=1e-2)).error / rtn)
            r["gptq"].append(layer_error(W, gptq_quantize(W, H, args, block_size=16, act_order=True).weight, H) / rtn)
        mean = {k: sum(v) / len(v) for k, v in r.items()}
        rows.append(f"| {args.describe()} | {mean['ada']:.3f} | {mean['scale']:.3f} | {mean['gptq']:.3f} |")
    return rows


def step_time() -> str:
    probs = []
    for r, c in SMOLLM2_BLOCK:
        W, X = torch.randn(r, c), torch.randn(2048, c)
        probs.append((W, 2.0 / 2048 * X.T @ X))
    args = QuantArgs(bits=4, group_size=64, full_range=True)
    adaround_quantize(*probs[0], args, options=AdaRoundOptions(iters=2))  # warm-up
    out = []
    for clock, what in ((time.perf_counter, "wall"), (time.process_time, "CPU")):
        t = {}
        for iters in (1, 41):
            t0 = clock()
            for W, H in probs:
                adaround_quantize(W, H, args, options=AdaRoundOptions(iters=iters))
            t[iters] = clock() - t0
        step = (t[41] - t[1]) / 40
        total = 30 * (t[1] + 100 * step) / 60
        out.append(f"{what}: {t[1]:.2f} s set-up + {step:.3f} s per step per block -> 30 blocks x 100 steps ~ {total:.1f} min")
    return f"one SmolLM2-135M block ({torch.get_num_threads()} threads), " + "; ".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--no-timing", action="store_true")
    a = ap.parse_args()
    print(f"layer error / nearest rounding's, mean of {a.seeds} problems, {a.iters} Adam steps:\n")
    print("\n".join(quality(a.seeds, a.iters)))
    if not a.no_timing:
        print("\n" + step_time())


if __name__ == "__main__":
    main()
