"""Prefill speed and memory of SmolLM2-135M: fp32 vs bf16 vs W8A8 (Int8Linear), one run.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/w8a8_prefill.py [--tokens 512]

Each variant runs in its own subprocess (clean peak memory): load the fp32 model, convert
it, reset the kernel's peak-RSS counter (/proc/self/clear_refs), run a 512-token prefill
(batch 1, KV cache built, logits of the last position only, as generation does) and read
the peak. W8A8 = every linear of the decoder blocks as Int8Linear (int8 weight codes,
per-channel scales; per-token dynamic int8 activations; int32 accumulation), the
embeddings / lm_head in fp32. Int8 GEMM backends: ``int_mm`` (torch._int_mm),
``int32`` (torch.mm on int32), ``fp32_exact`` (float GEMM on the codes, exact in chunks).
A reference row uses PyTorch's stock fbgemm dynamic quantization (quantize_dynamic: a
different scheme, per-tensor activations) to show what a vectorized int8 kernel does here.

Prints a markdown table and writes runs/bench/w8a8_prefill.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

VARIANTS = ("fp32", "bf16", "w8a8-int_mm", "w8a8-int32", "w8a8-fp32_exact", "fbgemm-dynamic-ref")


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_variant(variant: str, tokens: int, budget_s: float) -> dict:
    import torch
    import torch.nn as nn

    from llmpress import api, models
    from llmpress.runtime.int8 import convert_to_int8, resolve_backend

    model, tok = models.load("smollm2-135m")
    ids = api.evaluation_windows(tok, model, api.EvalConfig(seqlen=tokens, max_windows=1))[:1]
    with torch.no_grad():
        ref = model(input_ids=ids, logits_to_keep=1).logits.float()
    backend = None
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant.startswith("w8a8-"):
        backend = variant.split("-", 1)[1]
        convert_to_int8(model, backend=backend, all_linears=True)
    elif variant == "fbgemm-dynamic-ref":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = model.model.layers
            model.model.layers = torch.ao.quantization.quantize_dynamic(blocks, {nn.Linear}, dtype=torch.qint8)
        backend = "fbgemm quantize_dynamic"
    gc.collect()
    try:  # hand freed heap pages (the fp32 weights just replaced) back to the kernel
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    weights_mb = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20
    if variant == "fbgemm-dynamic-ref":  # packed int8 weights are not parameters/buffers: count their codes
        weights_mb += (
            sum(
                m.in_features * m.out_features
                for m in model.modules()
                if type(m).__name__ == "DynamicQuantizedLinear" or type(m).__name__ == "Linear" and "quantized" in type(m).__module__
            )
            / 2**20
        )
    rss_before = _status("VmRSS")
    reset_ok = _reset_peak()
    times = []
    t_start = time.perf_counter()
    with torch.no_grad():
        while True:
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t)
            if len(times) >= 6 or time.perf_counter() - t_start + times[-1] > budget_s:
                break
    peak = _status("VmHWM")
    logits = out.logits.float()
    steady = times[1:] if len(times) > 1 else times
    return {
        "variant": variant,
        "backend": backend,
        "runs": len(times),
        "first_s": times[0],
        "median_s": statistics.median(steady),
        "tokens_per_s": tokens / statistics.median(steady),
        "weights_mb": weights_mb,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "peak_reset": reset_ok,
        "prefill_extra_mb": peak - rss_before,
        "last_logit_rel_err_vs_fp32": float((logits - ref).norm() / ref.norm()),
        "auto_backend_here": resolve_backend("auto", "cpu"),
        "threads": torch.get_num_threads(),
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed prefills per variant (at least one run)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="runs/bench/w8a8_prefill.json")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_variant(a.one, a.tokens, a.budget)))
        return
    rows = []
    print(f"load average before: {os.getloadavg()}", flush=True)
    for v in a.variants.split(","):
        p = subprocess.run(
            [sys.executable, __file__, "--one", v, "--tokens", str(a.tokens), "--budget", str(a.budget)], capture_output=True, text=True
        )
        if p.returncode:
            print(f"{v}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{v:<20} median {row['median_s']:8.3f} s  ({row['runs']} runs)  weights {row['weights_mb']:7.1f} MiB  peak RSS {row['peak_rss_mb']:7.1f} MiB",
            flush=True,
        )
    fp = next((r for r in rows if r["variant"] == "fp32"), None)
    print()
    print(f"load average after: {os.getloadavg()} (2 cores; other users' work inflates every row alike)")
    print(
        f"SmolLM2-135M prefill of {a.tokens} tokens (batch 1, KV cache, last-position logits), {platform.processor() or platform.machine()}, {rows[0]['threads'] if rows else '?'} threads"
    )
    print()
    print(
        "| variant | int8 GEMM | prefill s (median) | tokens/s | vs fp32 | weights MiB | RSS before MiB | peak RSS MiB | last-logit rel. err vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{fp['median_s'] / r['median_s']:.2f}x" if fp else "-"
        print(
            f"| {r['variant']} | {r['backend'] or '-'} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} | {rel} | {r['weights_mb']:.1f} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['last_logit_rel_err_vs_fp32']:.2e} |"
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"tokens": a.tokens, "rows": rows, "cpu": platform.processor(), "pid": os.getpid()}, indent=2))


if __name__ == "__main__":
    main()
