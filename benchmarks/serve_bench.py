"""Serving figures of SmolLM2-135M on this machine: W4A16 and W8A8 against fp32 and bf16, one run.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/serve_bench.py [--repeats 3]

Makes the packed checkpoints if they are missing (RTN needs no data):

    llmpress compress smollm2-135m --recipe rtn-w4g64 --out runs/w4 --no-eval
    llmpress compress smollm2-135m --recipe rtn-w4g64-head8 --out runs/w4h8 --no-eval
    llmpress compress smollm2-135m --recipe rtn-w8a8 --out runs/w8a8 --no-eval

then runs what `llmpress bench runs/w8a8 runs/w4@torch runs/w4 runs/w4h8` runs (w4@torch:
the W4 checkpoint on torch's int4 kernel, for comparison with llmpress's own) (llmpress.bench: prefill of
512 tokens, decode of 128 new tokens at batch 1 and 8, resident weights, peak RSS per
variant in its own process, checkpoint bytes against theory, per-layer kernel ratios)
and writes runs/bench/serve.json and runs/bench/serve.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmpress import api, bench
from llmpress.export.packed_load import read_manifest

CHECKPOINTS = {"w4": "rtn-w4g64", "w4h8": "rtn-w4g64-head8", "w8a8": "rtn-w8a8"}
ORDER = ["w8a8", "w4", "w4h8"]


def ensure(out: Path, recipe: str) -> None:
    if read_manifest(out) is not None:
        return
    print(f"making {out} ({recipe}, no evaluation)", file=sys.stderr)
    api.run_pipeline("smollm2-135m", recipe, out=str(out), evaluation=None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs", help="folder of the checkpoints and results (default runs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=ORDER, default=ORDER)
    ap.add_argument("--no-torch-kernels", action="store_true", help="leave out w4@torch (the W4 checkpoint on torch's int4 kernel)")
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="only the memory probes (one fresh process per variant): resident weights, RSS after load, peak RSS",
    )
    args = ap.parse_args()
    runs = Path(args.runs)
    dirs = []
    for name in args.only:
        ensure(runs / name, CHECKPOINTS[name])
        if name == "w4" and not args.no_torch_kernels:
            dirs.append(str(runs / name) + "@torch")
        dirs.append(str(runs / name))
    cfg = bench.BenchConfig(repeats=args.repeats)
    if args.memory_only:
        return memory_only(dirs, cfg, runs / "bench")
    result = bench.run(dirs, None, cfg, progress=lambda m: print(f"bench: {m}", file=sys.stderr, flush=True))
    text = bench.table(result)
    out = runs / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2, default=repr))
    cmd = "flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/serve_bench.py " + " ".join(sys.argv[1:])
    (out / "serve.md").write_text(f"`{cmd.strip()}`\n\nEnvironment: {json.dumps(result['environment'])}\n\n{text}\n")
    print(text)
    print(f"\nwritten: {out / 'serve.json'}, {out / 'serve.md'}")
    return 0


def memory_only(dirs: list[str], cfg, out: Path) -> int:
    variants, _ = bench.plan_variants(dirs)
    bare = bench.run_probe(bench.Variant(name="none", kind="none", path=""), cfg)["rss_mb"]
    rows = {v.name: bench.run_probe(v, cfg) for v in variants}
    lines = [
        f"bare process (python + torch + transformers): {bare:.0f} MB RSS",
        "",
        "| variant | weights MB | RSS after load MB | peak RSS MB (load, prefill 512, decode b=8) |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['resident_weight_bytes'] / 1e6:.1f} | {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_memory.json").write_text(json.dumps({"bare_process_rss_mb": bare, "variants": rows}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
