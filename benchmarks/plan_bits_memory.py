"""Peak RSS of ``llmpress plan-bits`` with and without its Fisher pass (issue 19: memory is part
of the product; the Fisher weighting runs a backward pass of the dense model; ``fisher-token``
also keeps a weight per token and linear, and one cost Hessian per linear of a block).

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/plan_bits_memory.py [--model smollm2-135m] [--windows 8]

Runs the public CLI (``llmpress plan-bits MODEL --budget 4.25 --weighting W``, one subprocess
per run, default flags otherwise) and reads each child's peak RSS from the kernel
(``os.wait4``'s ``ru_maxrss``), beside the fp32 bytes of the model's weights. The Fisher pass
costs the difference between the two rows (its batch and window length are the command's).
Prints a markdown table and writes runs/bench/plan_bits_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory_phases import cli  # noqa: E402


def weight_mb(model: str) -> float:
    """fp32 bytes of the model's parameters (MB), from its safetensors headers."""
    from common import model_folder
    from safetensors import safe_open

    n = 0
    for f in model_folder(model).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += _numel(st.get_slice(k).get_shape())
    return n * 4 / 1e6


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def run_once(model: str, weighting: str, windows: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*cli(), "plan-bits", model, "--budget", "4.25", "--weighting", weighting, "--calib-samples", str(windows),
               "--out", str(Path(tmp) / "plan.yaml"), "--no-progress", *extra]  # fmt: skip
        print(" ".join(cmd), flush=True)
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"exit status {status}:\n{log[-4000:]}")
        return {
            "weighting": weighting,
            "command": " ".join(cmd),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "wall_s": round(time.perf_counter() - t, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8, help="--calib-samples of each run")
    ap.add_argument("--out", default="runs/bench/plan_bits_memory.json")
    ap.add_argument("--weightings", default="none,fisher,fisher-token", help="the --weighting of each run, comma-separated")
    ap.add_argument("extra", nargs="*", help="flags passed to `llmpress plan-bits` (after --)")
    a = ap.parse_args()
    w = weight_mb(a.model)
    runs = [run_once(a.model, wt, a.windows, a.extra) for wt in a.weightings.split(",")]
    print(f"\nmodel {a.model}: fp32 weights {w:.0f} MB; {a.windows} calibration windows\n")
    print("| weighting | peak RSS (MB) | x fp32 weights | wall s |\n|---|---:|---:|---:|")
    for r in runs:
        print(f"| {r['weighting']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / w:.2f} | {r['wall_s']:.0f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "fp32_weights_mb": round(w, 1), "windows": a.windows, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
