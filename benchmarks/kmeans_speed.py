"""Weighted 1-D k-means of whole SmolLM2-sized layers (quant/kmeans.py): time on one core and
total weighted error against the exact optimum, for the default solver and Lloyd alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kmeans_speed.py [--exact]

Rows of Gaussian values with random sensitivities in [0, 1] (seed 0): 1536 rows of 576 values
(q/k/v/o/gate/up-shaped: one table per output row) and 576 rows of 1536 (down_proj-shaped), at
K = 8 and 16 entries. ``--exact`` also runs the exact programme (minutes) for the ratios.
"""

import argparse
import time

import torch

from llmpress.quant.kmeans import kmeans_1d, kmeans_1d_exact, kmeans_1d_lloyd, weighted_error


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exact", action="store_true", help="also the exact optimum (slow) and each solver's ratio to it")
    a = ap.parse_args()
    print("| rows x values | K | solver | seconds | error | x exact |")
    print("|---|---|---|---|---|---|")
    for R, n in ((1536, 576), (576, 1536)):
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(R, n, generator=g), torch.rand(R, n, generator=g)
        for k in (8, 16):
            solvers = {"kmeans_1d (default)": kmeans_1d, "kmeans_1d_lloyd": kmeans_1d_lloyd}
            if a.exact:
                solvers["kmeans_1d_exact"] = kmeans_1d_exact
            res = {}
            for name, fn in solvers.items():
                t = time.process_time()
                c, codes = fn(x, k, w)
                res[name] = (time.process_time() - t, float(weighted_error(x, c, codes, w).sum()))
            ref = res.get("kmeans_1d_exact", (None, None))[1]
            for name, (sec, err) in res.items():
                ratio = f"{err / ref:.4f}" if ref else ""
                print(f"| {R} x {n} | {k} | {name} | {sec:.2f} | {err:.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
