"""What recovery by distillation adds to a compress's peak RSS, per ``recover_train`` (all
parameters, norms only, LoRA adapters) with and without ``recover_checkpoint``, on
SmolLM2-135M (or ``--model``).

    .venv/bin/python benchmarks/distill_memory.py [--steps 3] [--windows 16]

Each row is a fresh process running ``llmpress.compress`` (the public API) with one stage:
``drop_layers`` of 20% of the blocks (Block Influence on 4 windows) and ``--steps``
recovery steps of 4 windows of 256 tokens (``recover_steps``, ``recover_train``), on
``--windows`` calibration windows of 512 tokens; the first row has no recovery. Prints the
peak RSS of each process (the kernel's high-water mark, ``report.peak_rss_mb``), the RSS after
loading, and what the recovery trained. Memory only: the seconds are printed for reference
and are not a speed measurement (run it alone for that).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MODES = ("none", "all", "all+checkpoint", "norms", "lora", "lora+checkpoint")


def child(model_name: str, mode: str, steps: int, windows: int) -> dict:
    import time

    import llmpress
    from llmpress import models
    from llmpress.eval.memory import rss_mb
    from llmpress.settings import CalibConfig, calibration_windows

    model, tok = models.load(model_name)
    loaded = rss_mb()
    data = calibration_windows(tok, model, CalibConfig(n_samples=windows))
    n_blocks = model.config.num_hidden_layers
    stage = {"method": "drop_layers", "count": max(1, round(0.2 * n_blocks)), "windows": 4}
    if mode != "none":
        train, _, ckpt = mode.partition("+")
        stage.update(recover_steps=steps, recover_lr=3e-4, recover_seqlen=256, recover_train=train, recover_checkpoint=bool(ckpt))
    t = time.perf_counter()
    report = llmpress.compress(model, llmpress.recipe.Recipe.from_dict({"stages": [stage]}), data=data)
    rec = next(iter(report.stages.values())).get("recovery") or {}
    return {
        "mode": mode,
        "loaded_mb": loaded,
        "peak_rss_mb": report.peak_rss_mb,
        "seconds": time.perf_counter() - t,
        "trained_parameters": rec.get("trained_parameters", 0),
        "kl_before": rec.get("kl_before"),
        "kl_after": rec.get("kl_after"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.model, a.child, a.steps, a.windows)))
        return
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--model", a.model, "--steps", str(a.steps), "--windows", str(a.windows), "--child", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mb"]
    print(f"model {a.model}, {a.steps} recovery steps of 4 x 256 tokens\n")
    print("| recover_train | trained parameters | peak RSS MB | over no recovery MB | RSS after load MB | seconds (reference) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['trained_parameters'] / 1e6:.2f}M | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - base:+.0f} | "
            f"{r['loaded_mb']:.0f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
