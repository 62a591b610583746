"""Rotation benchmark: W4A4KV4 / W4A8 / W8A8 perplexity with each rotation method.

Rows: no rotation (RTN), SmoothQuant + RTN (when the method exists), QuaRot + RTN,
QuaRot + GPTQ, DuQuant + RTN, SpinQuant + RTN, SpinQuant + GPTQ (more with ``--rows``:
any of none/smoothquant/quarot/quarot-online/duquant/duquant-online/spinquant with -rtn or
-gptq).
Columns:

- W4A4KV4: weights int4 sym group 64 (or the row's GPTQ), activations int4 sym per
  token (dynamic), keys/values int4 asym per head and token;
- W4A8: the same weights, int8 per-token activations, 16-bit KV cache;
- W8A8: int8 per-channel weights (RTN), int8 per-token activations, 16-bit KV cache.

Each rotation is applied to the full-precision model once and shared by its rows and
columns (SpinQuant learns its rotation with the W4A4KV4 quantizers and reuses it for the
other columns; W8A8 always uses RTN weights, so GPTQ rows skip it), measures the difficulty of the
activations that feed q/k/v and down_proj (max/median ratio and kurtosis, per layer, on
two calibration windows), then quantizes a copy per column and evaluates perplexity.

Run (heavy: about an hour or more on 2 CPU cores)::

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/rotations.py \\
        --model smollm2-135m --out benchmarks/results/rotations-smollm2

Rows ending in ``-clip`` (e.g. ``quarot-gptq-clip``) use QuaRot's fixed clipping of the
4-bit quantizers (activations at 0.9 of each token's range, KV cache at 0.95) and fill the
W4A4KV4 column only. GPTQ rows use the gptq stage's defaults (activation order, damp 0.01);
``--gptq-damp 0.3`` gives them the W4A4KV4 presets' damping. ``--merge a.json b.json --out p``
joins runs with the same settings (e.g. rows added later) into one table.

Small check: ``--eval-windows 4 --calib-windows 8 --rows quarot-rtn --columns W4A4KV4``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_SOURCES, eval_sets, score  # noqa: E402

from llmpress import models
from llmpress.api import CalibConfig, calibration_windows, compress
from llmpress.arch import get_arch, get_module
from llmpress.quant import QuantArgs
from llmpress.recipe import stage
from llmpress.registry import METHODS, get_method

log = logging.getLogger("rotations")

W4 = QuantArgs(bits=4, symmetric=True, granularity="group", group_size=64)
W8 = QuantArgs(bits=8, symmetric=True, granularity="channel")
A4 = QuantArgs(bits=4, symmetric=True, granularity="token")
A8 = QuantArgs(bits=8, symmetric=True, granularity="token")
KV4 = QuantArgs(bits=4, symmetric=False, granularity="token")

COLUMNS = {
    "W4A4KV4": dict(weights=W4, activations=A4, kv=KV4),
    "W4A8": dict(weights=W4, activations=A8, kv=None),
    "W8A8": dict(weights=W8, activations=A8, kv=None, rtn_only=True),
}

# rotation -> (stage factory, or None, or "smoothquant"; label)
ROTATIONS = {
    "none": (None, "no rotation"),
    "smoothquant": ("smoothquant", "SmoothQuant"),
    "quarot": (lambda a: stage("quarot", seed=a.seed), "QuaRot"),
    "quarot-online": (lambda a: stage("quarot", seed=a.seed, residual="online"), "QuaRot (online norm-output rotations, gains kept)"),
    "duquant": (lambda a: stage("duquant", seed=a.seed), "DuQuant"),
    "duquant-online": (lambda a: stage("duquant", seed=a.seed, residual="online"), "DuQuant (online per block)"),
    "spinquant": (lambda a: stage("spinquant", seed=a.seed, steps=a.spin_steps), "SpinQuant"),
    # the rotations learned against the W4 RTN weights (rounded in the loss, the paper's setting
    # for RTN) instead of float weights (the stage default, the paper's setting before GPTQ)
    "spinquant-wq": (lambda a: stage("spinquant", seed=a.seed, steps=a.spin_steps, weights=W4), "SpinQuant (W4 weights rounded in its loss)"),
}
# a row is rotation-weightmethod[-clip]; rows sharing a rotation share one rotated model.
# -clip: QuaRot's fixed clipping of the 4-bit quantizers (activations 0.9, KV cache 0.95),
# measured in the W4A4KV4 column only.
ACT_CLIP, KV_CLIP = 0.9, 0.95
ROWS = [f"{r}-{w}{c}" for r in ROTATIONS for w in ("rtn", "gptq") for c in ("", "-clip")]

DEFAULT_ROWS = ["none-rtn", "smoothquant-rtn", "quarot-rtn", "quarot-gptq", "duquant-rtn", "spinquant-rtn", "spinquant-gptq"]
# W8A8 uses RTN weights in every row: a GPTQ row repeats its RTN row there, so it is skipped
GPTQ_COLUMNS = ("W4A4KV4", "W4A8")


def parse_row(row: str) -> tuple[str, str, bool]:
    """'quarot-gptq-clip' -> ('quarot', 'gptq', True)."""
    clip = row.endswith("-clip")
    base = row[: -len("-clip")] if clip else row
    rot, w = base.rsplit("-", 1)
    return rot, w, clip


# ----------------------------------------------------------------------------- difficulty


def _kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    x = x - x.mean()
    v = x.pow(2).mean()
    return float(x.pow(4).mean() / (v * v)) if v > 0 else float("nan")


def _max_over_median(x: torch.Tensor) -> float:
    a = x.float().abs().flatten()
    med = a.median()
    return float(a.max() / med) if med > 0 else float("inf")


@torch.no_grad()
def difficulty(model, windows: torch.Tensor) -> dict:
    """Per layer: max|x|/median|x| and kurtosis of the inputs of q_proj (= k/v) and down_proj.

    The inputs are taken where the quantizer sees them: after any online rotation
    (ActQuantLinear-free model, so the hook on the linear sees what would be quantized).
    """
    spec = get_arch(model)
    layers = get_module(model, spec.blocks)
    got: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, block in enumerate(layers):
        for site, path in (("qkv_in", spec.q), ("down_in", spec.down)):

            def hook(_m, inp, _k=(i, site)):
                got.setdefault(_k, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))

            handles.append(get_module(block, path).register_forward_pre_hook(hook))
    try:
        for ids in windows.split(1):
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for site in ("qkv_in", "down_in"):
        mom, kur = [], []
        for i in range(len(layers)):
            x = torch.cat(got[(i, site)])
            mom.append(_max_over_median(x))
            kur.append(_kurtosis(x))
        out[site] = {
            "max_over_median": {"mean": sum(mom) / len(mom), "max": max(mom), "per_layer": mom},
            "kurtosis": {"mean": sum(kur) / len(kur), "max": max(kur), "per_layer": kur},
        }
    return out


# ----------------------------------------------------------------------------- runs


def quant_stages(row_method: str, col: dict, smooth: bool, clip: bool = False, gptq_damp: float | None = None):
    """The stages after the rotation: SmoothQuant's scales (its rows), the KV quantizer, then the
    weight method with the column's activations; ``gptq_damp`` overrides GPTQ's damping."""
    weights, acts, kv = col["weights"], col["activations"], col["kv"]
    if clip:
        acts = dataclasses.replace(acts, clip_ratio=ACT_CLIP)
        kv = dataclasses.replace(kv, clip_ratio=KV_CLIP) if kv is not None else None
    method = "rtn" if col.get("rtn_only") else row_method
    st = []
    if smooth:
        st.append(stage("smoothquant", weights=weights, activations=acts))
    if kv is not None:
        st.append(stage("kv_quant", keys=kv, values=kv))
    extra = {"damp": gptq_damp} if method == "gptq" and gptq_damp is not None else {}
    st.append(stage(method, weights=weights, activations=acts, **extra))
    return st


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--columns", default=",".join(COLUMNS), help=f"comma-separated, from {', '.join(COLUMNS)}")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--spin-steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--eval", default=EVAL_SOURCES, help="test texts (an --eval-data list); each cell gives the first one's ppl and every source's ratio"
    )
    ap.add_argument(
        "--gptq-damp",
        type=float,
        default=None,
        help="GPTQ rows: damping (fraction of the mean Hessian diagonal; default the gptq stage's 0.01; the W4A4KV4 presets use 0.3)",
    )
    ap.add_argument("--no-metrics", action="store_true")
    ap.add_argument("--out", default=None, help="path prefix for .json and .md results")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="print (and with --out write) one table from result files of runs with the same model and windows",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    get_method("rtn")  # fills the registry
    rows = [r for r in args.rows.split(",") if r]
    cols = [c for c in args.columns.split(",") if c]
    bad = [r for r in rows if r not in ROWS] + [c for c in cols if c not in COLUMNS]
    if bad:
        ap.error(f"unknown rows/columns: {bad}")
    if args.merge:
        res = merge([json.loads(Path(f).read_text()) for f in args.merge])
        cols = [c for c in COLUMNS if any(c in row["columns"] for row in res["rows"].values())]
        if args.out:
            _write(args.out, res, cols)
        print(markdown(res, cols))
        return 0
    if "smoothquant" not in METHODS and any(r.startswith("smoothquant-") for r in rows):
        log.warning("method smoothquant is not registered: skipping its rows")
        rows = [r for r in rows if not r.startswith("smoothquant-")]
    if "gptq" not in METHODS and any(parse_row(r)[1] == "gptq" for r in rows):
        log.warning("method gptq is not registered: skipping GPTQ rows")
        rows = [r for r in rows if parse_row(r)[1] != "gptq"]

    t0 = time.perf_counter()
    base, tok = models.load(args.model)
    sets = eval_sets(tok, base, args.eval, args.eval_windows, args.seqlen)
    ev = next(iter(sets.values()))
    cal = calibration_windows(tok, base, CalibConfig(n_samples=args.calib_windows, seqlen=args.seqlen))
    metric_windows = cal[:2]
    results = {
        "model": args.model,
        "args": vars(args),
        "rows": {},
        "rotations": {},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()},
    }
    t = time.perf_counter()
    fp_by = score(base, sets)
    fp = fp_by[next(iter(sets))]
    results["fp"] = {"ppl": fp, "ppl_by_source": fp_by, "eval_s": time.perf_counter() - t}
    log.info("full precision ppl %.3f (%d windows)", fp, ev.shape[0])
    if not args.no_metrics:
        results["fp"]["difficulty"] = difficulty(base, metric_windows)
    del base

    order = []
    for r in rows:
        rot = parse_row(r)[0]
        if rot not in order:
            order.append(rot)
    for rot_name in order:
        rot, label = ROTATIONS[rot_name]
        model, _ = models.load(args.model)
        info = {"label": label}
        t = time.perf_counter()
        if callable(rot):
            compress(model, [rot(args)], data=cal)
            info["transform"] = getattr(model, "llmpress_transforms", None)
        info["rotate_s"] = time.perf_counter() - t
        log.info("%s: rotation done in %.0fs", label, info["rotate_s"])
        if callable(rot) and not args.no_metrics:
            info["difficulty"] = difficulty(model, metric_windows)
        results["rotations"][rot_name] = info
        jobs = []
        for r in rows:
            rot_r, w, clip = parse_row(r)
            if rot_r != rot_name:
                continue
            tag = f", damp {args.gptq_damp:g}" if w == "gptq" and args.gptq_damp is not None else ""
            tag += f", clipped (A {ACT_CLIP:g}, KV {KV_CLIP:g})" if clip else ""
            results["rows"][r] = {"label": f"{label} + {w.upper()}{tag}", "rotation": rot_name, "columns": {}}
            jobs += [(r, w, c, clip) for c in cols if (w == "rtn" or c in GPTQ_COLUMNS) and (not clip or c == "W4A4KV4")]
        for k, (r, w, c, clip) in enumerate(jobs):
            m = copy.deepcopy(model) if k < len(jobs) - 1 else model
            t = time.perf_counter()
            rep = compress(m, quant_stages(w, COLUMNS[c], smooth=rot == "smoothquant", clip=clip, gptq_damp=args.gptq_damp), data=cal)
            qs = time.perf_counter() - t
            t = time.perf_counter()
            p_by = score(m, sets)
            p = p_by[next(iter(sets))]
            es = time.perf_counter() - t
            results["rows"][r]["columns"][c] = {
                "ppl": p,
                "ratio": p / fp,
                "ppl_by_source": p_by,
                "ratio_by_source": {s: v / fp_by[s] for s, v in p_by.items()},
                "quantize_s": qs,
                "eval_s": es,
                "bits_per_weight": rep.bits_per_weight,
                "size_mb": rep.size_mb,
            }
            log.info("%-30s %-8s ppl %10.3f  ratio %7.3f  (quantize %.0fs, eval %.0fs)", results["rows"][r]["label"], c, p, p / fp, qs, es)
            del m
            if args.out:
                _write(args.out, results, cols)
        del model
    results["total_s"] = time.perf_counter() - t0
    if args.out:
        _write(args.out, results, cols)
    print(markdown(results, cols))
    return 0


def merge(results: list[dict]) -> dict:
    """One result from several runs of this script (same model, windows and settings)."""
    first = results[0]
    keys = ("eval_windows", "seqlen", "calib_windows", "seed", "spin_steps", "eval")
    gptq = [r for r in results if any(parse_row(k)[1] == "gptq" for k in r["rows"])]
    if len({r["args"].get("gptq_damp") for r in gptq}) > 1:  # RTN rows do not depend on it
        raise SystemExit(f"cannot merge GPTQ rows of runs with different --gptq-damp: {[r['args'].get('gptq_damp') for r in gptq]}")
    for r in results[1:]:
        if r["model"] != first["model"] or any(r["args"].get(k) != first["args"].get(k) for k in keys):
            raise SystemExit(f"cannot merge runs with different settings: {[(k, r['args'].get(k), first['args'].get(k)) for k in keys]}")
        if abs(r["fp"]["ppl"] - first["fp"]["ppl"]) > 1e-6 * first["fp"]["ppl"]:
            raise SystemExit(f"cannot merge: full-precision ppl differs ({r['fp']['ppl']} vs {first['fp']['ppl']})")
    out = {**first, "rows": {}, "rotations": {}, "merged_from": len(results)}
    for r in results:
        for k, row in r["rows"].items():  # cells of the same row measured in different runs join
            have = out["rows"].setdefault(k, {**row, "columns": {}})
            have["columns"].update(row["columns"])
        for k, info in r["rotations"].items():  # a --no-metrics run keeps an earlier run's difficulty
            out["rotations"].setdefault(k, {}).update(info)
    return out


def _fmt(v):
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "-"
    return f"{v:.2f}" if v < 1000 else f"{v:.3g}"


def markdown(res: dict, cols: list[str]) -> str:
    fp = res["fp"]["ppl"]
    fp_by = res["fp"].get("ppl_by_source", {"wiki": fp})
    lines = [f"Model {res['model']}, up to {res['args']['eval_windows']} x {res['args']['seqlen']}-token test windows per text; full precision ppl "
             + ", ".join(f"{s} {v:.3f}" for s, v in fp_by.items()) + ".", ""]  # fmt: skip
    if len(fp_by) > 1:
        lines += [f"Each cell: {next(iter(fp_by))} ppl (x fp), then the ratio to full precision on " + " / ".join(list(fp_by)[1:]) + ".", ""]
    lines.append("| method | " + " | ".join(f"{c} ppl (x fp)" for c in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for row in res["rows"].values():
        cells = []
        for c in cols:
            x = row["columns"].get(c)
            more = "".join(f" / {_fmt(v)}x" for s, v in x.get("ratio_by_source", {}).items() if s != next(iter(fp_by))) if x else ""
            cells.append("-" if x is None else f"{_fmt(x['ppl'])} ({_fmt(x['ratio'])}x{more})")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    if "difficulty" in res["fp"]:
        lines.append("Difficulty of the quantized inputs (mean over layers / worst layer), 2 calibration windows:")
        lines.append("")
        lines.append("| model | q/k/v in max/median | q/k/v in kurtosis | down_proj in max/median | down_proj in kurtosis |")
        lines.append("|---|---|---|---|---|")

        def cells(d):
            out = []
            for site in ("qkv_in", "down_in"):
                for k in ("max_over_median", "kurtosis"):
                    out.append(f"{_fmt(d[site][k]['mean'])} / {_fmt(d[site][k]['max'])}")
            return out

        lines.append("| full precision, no rotation | " + " | ".join(cells(res["fp"]["difficulty"])) + " |")
        for info in res["rotations"].values():
            if "difficulty" in info:
                lines.append(f"| {info['label']} | " + " | ".join(cells(info["difficulty"])) + " |")
    return "\n".join(lines)


def _write(prefix: str, res: dict, cols: list[str]) -> None:
    p = Path(prefix)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    p.with_suffix(".md").write_text(markdown(res, cols) + "\n")


if __name__ == "__main__":
    sys.exit(main())
