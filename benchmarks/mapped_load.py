"""A model run on views of its mapped weights file against the same model in memory of its own.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/mapped_load.py [--models smollm2-135m gemma3-270m] [--rounds 3]

transformers' ``from_pretrained`` leaves a float32 checkpoint's tensors as views of the
privately mapped safetensors file; ``llmpress.load`` moves them into memory of their own
(export/mapped.py ``own_memory``). Per model, both are loaded in this one process and measured
in turns, ``--rounds`` times, medians: one matrix-vector product over the output head's weight,
prefill of 512 tokens, decode tokens/s at batch 1 and 8 (the benchmarks' common ``speed``).
Writes runs/bench/mapped_load.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import main_guard, model_folder, speed  # noqa: E402

import llmpress  # noqa: E402
from llmpress.export.mapped import mapped_ranges  # noqa: E402


def views(model) -> int:
    """Bytes of ``model``'s parameters and buffers that view a mapped safetensors file."""
    ranges = mapped_ranges()
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.numel() and any(lo <= t.data_ptr() < hi for lo, hi in ranges):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def head_gemv_ms(model, reps: int = 20) -> float:
    w = model.get_output_embeddings().weight.detach()
    x = torch.randn(w.shape[1], 1)
    w @ x
    t = time.perf_counter()
    for _ in range(reps):
        w @ x
    return (time.perf_counter() - t) / reps * 1e3


def one_model(alias: str, rounds: int, repeats: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    folder = model_folder(alias)
    mapped = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    own, tok = llmpress.load(alias)
    variants = {"views of the mapped file (transformers)": mapped, "memory of its own (llmpress.load)": own}
    seen = {k: [] for k in variants}
    for _ in range(rounds):
        for label, m in variants.items():
            with torch.no_grad():
                seen[label].append({"head_gemv_ms": head_gemv_ms(m), **speed(m, tok, repeats, new_tokens)})
    out = {}
    for label, runs in seen.items():
        out[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        out[label]["mapped_mb"] = views(variants[label]) / 2**20
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timings per measurement (medians)")
    ap.add_argument("--decode", type=int, default=32, help="new tokens per decode measurement")
    ap.add_argument("--out", default="runs/bench/mapped_load.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    res = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(), "models": {}}
    for alias in a.models:
        res["models"][alias] = one_model(alias, a.rounds, a.repeats, a.decode)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"\n{res['cpu']}, {res['threads']} threads\n")
    print("| model | weights | mapped MB | head GEMV ms | prefill 512 s | decode b1 tok/s | decode b8 tok/s |\n|---|---|---|---|---|---|---|")
    for alias, rows in res["models"].items():
        base = next(iter(rows.values()))
        for label, r in rows.items():
            print(
                f"| {alias} | {label} | {r['mapped_mb']:.0f} | {r['head_gemv_ms']:.1f} ({base['head_gemv_ms'] / r['head_gemv_ms']:.2f}x) | "
                f"{r['prefill_512_s']:.3f} ({base['prefill_512_s'] / r['prefill_512_s']:.2f}x) | "
                f"{r['decode_tps_b1']:.1f} ({r['decode_tps_b1'] / base['decode_tps_b1']:.2f}x) | "
                f"{r['decode_tps_b8']:.1f} ({r['decode_tps_b8'] / base['decode_tps_b8']:.2f}x) |"
            )
    return 0


if __name__ == "__main__":
    main_guard(main)
