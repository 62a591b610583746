"""llmpress GPTQ against llm-compressor's GPTQModifier on SmolLM2-135M, same settings, one run.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/gptq_vs_peer.py [--bits 4 3] [--windows 64] [--eval wiki,news,code]

Settings shared by both tools: symmetric int weights, group 64, every Linear but lm_head,
block 128, dampening 0.01, activation order with static groups (the peer's default
``actorder: static``; llmpress ``act_order: true, static_groups: true``), the same 128
calibration windows of 512 tokens (llmpress.api.calibration_windows, seed 0) and the same
64 test windows of 512 tokens of each test text (llmpress.api.evaluation_windows; Wikipedia,
news and code by default, one perplexity column each), passed to the peer as .npy
token ids, and the same HF safetensors folder of the model (the one llmpress converts
into $LLMPRESS_CACHE/models/smollm2-135m).

The peer runs in its own virtual environment, benchmarks/.venv-peer (created here by
benchmarks/peer_venv.sh when missing; llm-compressor is never a dependency of llmpress),
as a child process (benchmarks/peer_gptq_worker.py). Wall times are the compression calls
alone (llmpress.compress / llmcompressor.oneshot): no model loading, no evaluation.
Results: runs/bench/gptq_vs_peer.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llmpress import QuantArgs, api, models, stage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import EVAL_SOURCES, eval_sets, score  # noqa: E402
from common import ensure_peer_venv as _ensure_venv  # noqa: E402

PEER_PY = HERE / ".venv-peer" / "bin" / "python"


def ensure_peer_venv() -> str | None:
    """Create the peer's virtual environment if needed; return why it failed, or None."""
    return _ensure_venv(HERE / ".venv-peer", HERE / "peer_venv.sh", "llmcompressor==0.14.0.1")


def run_peer(folder: Path, calib_npy: Path, eval_npy, bits: int, group: int, actorder: str, out: Path) -> dict:
    """``eval_npy``: one .npy path, or {source: path} (the result then has ``ppl_by_source``)."""
    evals = [f"{k}={v}" for k, v in eval_npy.items()] if isinstance(eval_npy, dict) else [str(eval_npy)]
    cmd = [
        str(PEER_PY),
        str(HERE / "peer_gptq_worker.py"),
        "--model",
        str(folder),
        "--calib",
        str(calib_npy),
        "--eval",
        *evals,
        "--bits",
        str(bits),
        "--group-size",
        str(group),
        "--actorder",
        actorder,
        "--out",
        str(out),
    ]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"error": f"peer exited {r.returncode}: {r.stderr[-3000:]}", "process_s": time.perf_counter() - t}
    res = json.loads(out.read_text())
    res["process_s"] = time.perf_counter() - t
    return res


def run_llmpress(model, sets: dict, calib, bits: int, group: int, act_order: bool, observer: str = "minmax") -> dict:
    """``sets``: {source: test windows}; ``observer``: minmax or mse, with ``-full`` for the
    full-range symmetric grid (S = max|x| / (qmax + 1/2), the peer's convention)."""
    m = copy.deepcopy(model)
    obs, full = observer.removesuffix("-full"), observer.endswith("-full")
    st = stage(
        "gptq",
        weights=QuantArgs(bits=bits, symmetric=True, granularity="group", group_size=group, observer=obs, full_range=full),
        block_size=128,
        damp=0.01,
        act_order=act_order,
        static_groups=True,
    )
    t = time.perf_counter()
    rep = api.compress(m, [st], calib)
    wall = time.perf_counter() - t
    t = time.perf_counter()
    by_source = score(m, sets, 4)
    out = {
        "tool": "llmpress gptq",
        "bits": bits,
        "group_size": group,
        "act_order": act_order,
        "observer": observer,
        "compress_s": wall,
        "eval_s": time.perf_counter() - t,
        "ppl": next(iter(by_source.values())),
        "ppl_by_source": by_source,
        "bits_per_weight": rep.bits_per_weight,
        "seconds": rep.seconds,
        "threads": torch.get_num_threads(),
    }
    del m
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument(
        "--actorder",
        choices=["static", "none"],
        default="static",
        help="static: both tools in activation order with static groups; none: both in natural order",
    )
    ap.add_argument(
        "--observers",
        nargs="+",
        choices=["minmax", "mse", "minmax-full", "mse-full"],
        default=["minmax"],
        help="llmpress scale observers to run (one llmpress row each; -full: full-range symmetric grid, "
        "S = max|x| / (qmax + 1/2), the peer's convention); the peer uses its default min-max, full range",
    )
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--eval", default=EVAL_SOURCES, help="test texts (an --eval-data list): one perplexity column each")
    ap.add_argument("--fp-ppl", type=float, help="full-precision ppl of the first --eval text, measured before on the same windows")
    ap.add_argument("--out", default="runs/bench/gptq_vs_peer.json")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    folder = models.packaged_folder(a.model) if a.model in models.PACKAGED else Path(a.model)
    model, tok = models.load(a.model)
    calib = api.calibration_windows(tok, model, api.CalibConfig(n_samples=a.calib_samples, seqlen=a.seqlen, seed=0))
    sets = eval_sets(tok, model, a.eval, a.windows, a.seqlen)
    first = next(iter(sets))
    work = Path(a.out).parent / "gptq_vs_peer"
    work.mkdir(parents=True, exist_ok=True)
    calib_npy = work / "calib.npy"
    np.save(calib_npy, calib.numpy().astype(np.int64))
    eval_npy = {s: work / f"eval-{s}.npy" for s in sets}
    for s, w in sets.items():
        np.save(eval_npy[s], w.numpy().astype(np.int64))
    shapes = ", ".join(f"{s} {tuple(w.shape)}" for s, w in sets.items())
    print(f"model folder {folder}; calibration {tuple(calib.shape)}, test {shapes}; torch threads {torch.get_num_threads()}", flush=True)

    fp_by = score(model, {s: w for s, w in sets.items() if s != first or a.fp_ppl is None}, 4)
    if a.fp_ppl is not None:
        fp_by = {first: a.fp_ppl, **fp_by}
    fp = fp_by[first]
    print(
        "full precision ppl " + ", ".join(f"{s} {v:.3f}" for s, v in fp_by.items()) + (" (first given)" if a.fp_ppl is not None else ""), flush=True
    )
    peer_problem = None if a.skip_peer else ensure_peer_venv()
    if peer_problem:
        print(f"PEER UNAVAILABLE: {peer_problem}", flush=True)
    rows = []
    for bits in a.bits:
        if not a.skip_peer and not peer_problem:
            p = run_peer(folder, calib_npy, eval_npy, bits, a.group_size, a.actorder, work / f"peer-w{bits}.json")
            if "error" in p:
                print(f"W{bits} peer FAILED: {p['error']}", flush=True)
            else:
                print(f"W{bits} g{a.group_size} llm-compressor: {_cells(p, fp_by)}  oneshot {p['compress_s']:.1f}s", flush=True)
            rows.append(p)
        for obs in a.observers:
            r = run_llmpress(model, sets, calib, bits, a.group_size, a.actorder == "static", obs)
            print(
                f"W{bits} g{a.group_size} llmpress ({obs}): {_cells(r, fp_by)}  compress {r['compress_s']:.1f}s  "
                f"(calibration_forward {r['seconds'].get('calibration_forward', 0):.1f}s, solve {r['seconds'].get('stage0:gptq', 0):.1f}s, "
                f"capture {r['seconds'].get('capture', 0):.1f}s)",
                flush=True,
            )
            rows.append(r)

    print()
    print(
        f"{a.model}, full precision ppl {fp:.3f}; symmetric int, group {a.group_size}, all Linear but lm_head, "
        f"act order: {a.actorder}; {calib.shape[0]}x{calib.shape[1]} calibration; test windows: {shapes}"
    )
    print()
    print("| bits | tool | " + " | ".join(f"{s} ppl (x fp32)" for s in sets) + " | wall s | llmpress / peer time |")
    print("|---|---|" + "---|" * len(sets) + "---|---|")
    for bits in a.bits:
        peer = next((r for r in rows if r.get("tool", "").startswith("llm-compressor") and r.get("bits") == bits and "error" not in r), None)
        if peer:
            print(f"| W{bits} | llm-compressor GPTQ (min-max) | {_cells(peer, fp_by, ' | ')} | {peer['compress_s']:.1f} | |")
        for ours in (r for r in rows if r.get("tool") == "llmpress gptq" and r["bits"] == bits):
            ratio = f"{ours['compress_s'] / peer['compress_s']:.2f}" if peer else "-"
            print(f"| W{bits} | llmpress GPTQ ({ours['observer']}) | {_cells(ours, fp_by, ' | ')} | {ours['compress_s']:.1f} | {ratio} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    res = {"fp_ppl": fp, "fp_by_source": fp_by, "settings": vars(a), "peer_problem": peer_problem, "rows": rows}
    Path(a.out).write_text(json.dumps(res, indent=2, default=str))


def _cells(row: dict, fp_by: dict, sep: str = ", ") -> str:
    """'ppl (ratio x)' per test text of ``fp_by`` ('-' where the row lacks it)."""
    by = row.get("ppl_by_source") or {}
    return sep.join(f"{by[s]:.3f} ({by[s] / v:.3f}x)" if s in by else "-" for s, v in fp_by.items())


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
