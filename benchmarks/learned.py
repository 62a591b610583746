"""Learned rounding and mixed precision (issue 19): GPTQ, AWQ + GPTQ, AdaRound, block-wise
reconstruction (sequential and parallel), OmniQuant-style and Intel's AutoRound (peer) at W4,
W3 and W2 g64 weight-only, and mixed precision from ``llmpress plan-bits`` at 3.25 and 4.25
average bits per weight beside the uniform rows, on the three test texts with wall times.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/learned.py [--model smollm2-135m] [--rows a,b]
    .venv/bin/python benchmarks/learned.py --table [--out runs/bench/learned-smollm2-135m.json]

Each llmpress row compresses a fresh copy of the model with ``llmpress.api.compress``
(``--calib`` windows of 512 tokens from the packaged Wikipedia training split, seed 0) and
measures perplexity on ``--windows`` test windows of each text. W2 rows without a preset are
the W3 preset at 2 bits (the recipe is stored in the row). OmniQuant rows run only when the
preset exists (``omniquant-w4g64`` / ``omniquant-w3g64``); otherwise they are skipped with a note.
``awq-blockwise-*`` rows: the AWQ stage of the ``awq-gptq`` preset (its scales folded, nothing
rounded), then the ``blockwise`` preset's stage, as ``awq-gptq`` puts AWQ before GPTQ.

Mixed rows: ``llmpress.bitplan.plan_bits`` (what ``llmpress plan-bits`` runs) on the same
calibration windows, base ``--plan-base``, candidates ``--candidates``, layer errors of
nearest rounding (``mixed-B-rtn``) or of GPTQ (``mixed-B-gptq``), then the planned recipe through ``api.compress``; its wall time includes
the planning; the recipe is written beside the JSON (``...-mixed-3.25-rtn.yaml``).

AutoRound rows: ``auto-round`` 0.16.1 in its own virtual environment (``--peer-venv``, made
by benchmarks/peer_autoround.sh when missing), run as a child process
(benchmarks/peer_autoround_worker.py) on the same HF folder of the model and the same
calibration windows (handed over as safetensors), W{bits} g64 symmetric, its default
(200 iterations) and its "light" setting (50 iterations, lr 5e-3); it hands back the
fake-quantized weights of the linears it quantized, which are loaded into a copy of the model
here and scored with llmpress's perplexity on the same test windows. Bits per weight: bits +
16/64 (a float16 scale per group, as llmpress counts its own symmetric g64 rows); compress s:
AutoRound's constructor and quantize() (with its torch.compile unless ``--peer-compile off``).

W4A4KV4 rows: the presets ``quarot-w4a4kv4-gptq`` and ``duquant-w4a4kv4-gptq`` (the best
W4A4KV4 settings before learned clipping) beside ``quarot-w4a4kv4-omniquant`` (QuaRot's online
rotations, then OmniQuant's learned weight clipping trained with the int4 activations in the
loop) and ``duquant-w4a4kv4-blockwise`` (DuQuant, then block-wise reconstruction with the int4
activations in the loop, corrective targets) and ``quarot-w4a4kv4-blockwise`` (the same after
QuaRot's rotations), on the same windows; ``duquant-w4a4kv4-gptq-alpha-auto``:
the GPTQ preset with DuQuant's smoothing exponent searched per point (``smooth_alpha: auto``).

Rows are written to the JSON as they finish and rows already there are skipped (resume).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    Resumable,
    ensure_peer_venv,
    main_guard,
    model_folder,
    pick_rows,
    preset_recipe,
    print_saved_table,
    results_path,
    results_table,
    score,
    table_parser,
)

HERE = Path(__file__).resolve().parent
PEER_PKG = "auto-round==0.16.1"
PEER_SETTINGS = {"default": {"iters": 200}, "light": {"iters": 50, "lr": 5e-3}}  # AutoRound's own recipes (auto_round/cli/main.py)
MIXED_BUDGETS = (3.25, 4.25)
PLAN_SOLVERS = ("rtn", "gptq")
LIGHT = {"iters": 50, "lr": 5e-3, "windows_per_step": 8}  # blockwise at AutoRound's light setting (its batch of 8 windows)
HEAVY = {"iters": 200, "lr": 5e-3, "windows_per_step": 8}  # blockwise at AutoRound's default setting (200 steps of 8 windows, lr 1/iters)
MID = {"iters": 100, "lr": 1e-2, "windows_per_step": 8}  # half AutoRound's default steps, its batch of 8 windows (to beat it in less time)
# 140 steps of 8 windows, lr 1/iters as AutoRound's: the most steps that fit in AutoRound's W3 default
# time on the EPYC with AWQ's search first (mid: 100 steps in 1038 s against its 1445 s)
LONG = {"iters": 140, "lr": 7e-3, "windows_per_step": 8}
W4A4_ROWS = (
    "quarot-w4a4kv4-gptq",
    "duquant-w4a4kv4-gptq",
    "quarot-w4a4kv4-omniquant",
    "duquant-w4a4kv4-blockwise",
    "quarot-w4a4kv4-blockwise",
)  # rotations + GPTQ against learned clipping, and block-wise reconstruction with int4 activations in the loop


def _uniform(bits: int) -> dict:
    """key -> row spec of the uniform W{bits} g64 rows."""

    def preset(name: str) -> dict:
        if bits == 2:  # no W2 preset: the W3 one at 2 bits
            return {"kind": "recipe", "from": name.replace("w2", "w3"), "bits": 2}
        return {"kind": "preset", "name": name}

    def stack(first: str, then: str) -> dict:  # first's AWQ stage, then the stages of ``then``
        return {**preset(then), "awq_from": first.replace("w2", "w3")}

    rows = {
        f"gptq-w{bits}g64": preset(f"gptq-w{bits}g64"),
        f"awq-gptq-w{bits}g64": preset(f"awq-gptq-w{bits}g64"),
        f"adaround-w{bits}g64": preset(f"adaround-w{bits}g64"),
        f"blockwise-w{bits}g64": preset(f"blockwise-w{bits}g64"),
        f"blockwise-w{bits}g64-parallel": {**preset(f"blockwise-w{bits}g64"), "mode": "parallel"},
        f"awq-blockwise-w{bits}g64": stack(f"awq-gptq-w{bits}g64", f"blockwise-w{bits}g64"),
        f"blockwise-w{bits}g64-light": {**preset(f"blockwise-w{bits}g64"), "set": LIGHT},
        f"blockwise-w{bits}g64-heavy": {**preset(f"blockwise-w{bits}g64"), "set": HEAVY},
        f"blockwise-w{bits}g64-mid": {**preset(f"blockwise-w{bits}g64"), "set": MID},
        f"awq-blockwise-w{bits}g64-mid": {**stack(f"awq-gptq-w{bits}g64", f"blockwise-w{bits}g64"), "set": MID},
        f"awq-blockwise-w{bits}g64-long": {**stack(f"awq-gptq-w{bits}g64", f"blockwise-w{bits}g64"), "set": LONG},
        f"blockwise-w{bits}g64-sequential": {**preset(f"blockwise-w{bits}g64"), "mode": "sequential"},
        f"omniquant-w{bits}g64": {**preset(f"omniquant-w{bits}g64"), "optional": True},
    }
    rows.update({f"autoround-w{bits}g64-{s}": {"kind": "peer", "bits": bits, "setting": s} for s in PEER_SETTINGS})
    return rows


ROWS = {k: {**v, "class": f"W{b} g64"} for b in (4, 3, 2) for k, v in _uniform(b).items()}
ROWS.update({f"mixed-{b:g}-{s}": {"kind": "mixed", "budget": b, "solver": s, "class": f"{b:g} avg"} for b in MIXED_BUDGETS for s in PLAN_SOLVERS})
ROWS.update(
    {
        f"mixed-{b:g}-rtn-unweighted": {"kind": "mixed", "budget": b, "solver": "rtn", "weighting": "none", "class": f"{b:g} avg"}
        for b in MIXED_BUDGETS
    }
)
# the plan compressed by block-wise reconstruction: plan-bits on the W3 preset (costs after GPTQ),
# its per-setting stages learned together, one pass per block (calib/plan.py joint_runs)
ROWS.update(
    {
        f"mixed-{b:g}-blockwise": {"kind": "mixed", "budget": b, "solver": "gptq", "base": "blockwise-w3g64", "class": f"{b:g} avg"}
        for b in MIXED_BUDGETS
    }
)
# the same plan with group sizes as well as bit widths to choose from (a finer knapsack: W3 g128 at
# 3.125 bits frees bytes that W4 g64 or W3 g32 can spend where the layer errors are largest)
GROUP_CANDIDATES = "w2g64,w3g128,w3g64,w3g32,w4g128,w4g64,w8g64"
ROWS["mixed-3.25-blockwise-groups"] = {**ROWS["mixed-3.25-blockwise"], "candidates": GROUP_CANDIDATES}
# the same without W2, the bytes from W3 g128 instead (the hypothesis that W2 picks hold the learned
# plans back; measured 2026-12-06: worse, 1.375x against the plan with W2's 1.287x on Wikipedia)
W3UP_CANDIDATES = "w3g128,w3g64,w3g32,w4g128,w4g64,w8g64"
ROWS["mixed-3.25-blockwise-w3up"] = {**ROWS["mixed-3.25-blockwise"], "candidates": W3UP_CANDIDATES}
# the same plan with each setting's error measured on its decoder block's output (plan-bits
# --measure block, EXL2's measurement pass) instead of the linear's own output
ROWS.update({f"mixed-{b:g}-blockwise-measured": {**ROWS[f"mixed-{b:g}-blockwise"], "measure": "block"} for b in MIXED_BUDGETS})
# the same plan with each token's share of the loss gradient in the layer costs (plan-bits --weighting
# fisher-token: gemma's post-MLP norm makes the tokens with the largest down_proj inputs nearly silent)
ROWS.update({f"mixed-{b:g}-blockwise-token": {**ROWS[f"mixed-{b:g}-blockwise"], "weighting": "fisher-token"} for b in MIXED_BUDGETS})
ROWS.update({f"mixed-{b:g}-gptq-token": {**ROWS[f"mixed-{b:g}-gptq"], "weighting": "fisher-token"} for b in MIXED_BUDGETS})
ROWS["mixed-3.25-blockwise-groups-token"] = {**ROWS["mixed-3.25-blockwise-groups"], "weighting": "fisher-token"}
# the plan's costs after the base method itself: each setting learned by blockwise per block on the
# dense stream (plan-bits --solver blockwise), the weighting plan-bits picks by default (auto)
ROWS.update({f"mixed-{b:g}-blockwise-learned": {**ROWS[f"mixed-{b:g}-blockwise"], "solver": "blockwise", "weighting": "auto"} for b in MIXED_BUDGETS})
# the plan on the best uniform W3 preset: AWQ's scales stay one search over every linear (on the W3
# grid; plan-bits splits only stages that store codes), the block-wise stages split per setting
ROWS.update(
    {
        f"mixed-{b:g}-awq-blockwise": {"kind": "mixed", "budget": b, "solver": "gptq", "base": "awq-blockwise-w3g64", "class": f"{b:g} avg"}
        for b in MIXED_BUDGETS
    }
)
# rows measured with settings since changed (kept in the JSON under these keys, labelled here)
LEGACY = {
    "blockwise-w4g64-v1": "blockwise-w4g64 before 2026-12-04 (sequential, full-range grid, one clipping factor, float32 steps)",
    "blockwise-w4g64-v1-light": "the same at AutoRound's light setting (50 steps of 8 windows, lr 0.005)",
    "awq-blockwise-w4g64-v1": "AWQ scales, then the same",
    "blockwise-w4g64-v2": "blockwise-w4g64 v1 + sign-aware scale + bfloat16 steps (still sequential, one clipping factor)",
}
ROWS.update({k: {"kind": "preset", "name": k, "class": "W4A4KV4"} for k in W4A4_ROWS})
ROWS["duquant-w4a4kv4-gptq-alpha-auto"] = {
    "kind": "preset",
    "name": "duquant-w4a4kv4-gptq",
    "stage_set": {"duquant": {"smooth_alpha": "auto"}},
    "class": "W4A4KV4",
}


def recipe_of(key: str, spec: dict):
    """The recipe of an llmpress row (preset name or recipe dict), or None when its preset is missing."""
    from llmpress.recipe import presets

    base = spec.get("from", spec.get("name"))
    if base not in presets():
        return None
    changes = {}
    if spec.get("bits"):
        changes["weights"] = {"bits": spec["bits"]}
    if spec.get("mode"):
        changes["mode"] = spec["mode"]
    for k, v in spec.get("set", {}).items():
        changes[k] = {**changes.get(k, {}), **v} if isinstance(v, dict) else v
    if spec.get("awq_from"):  # AWQ's scales (its stage of the awq-gptq preset), then the row's own stages
        if spec["awq_from"] not in presets():
            return None
        grid = {k: v for k, v in changes.items() if k == "weights"}  # the row's other changes are the blockwise stage's
        awq = [st for st in preset_recipe(spec["awq_from"], key, **grid)["stages"] if st["method"] == "awq"]
        d = preset_recipe(base, key, **changes)
        d["stages"] = awq + d["stages"]
        d["description"] = f"AWQ scales from {spec['awq_from']}, then {d['description']}"
        return d
    if spec.get("stage_set"):  # fields of one method's stage (e.g. duquant's smooth_alpha)
        d = preset_recipe(base, key, **changes)
        for st in d["stages"]:
            st.update(spec["stage_set"].get(st["method"], {}))
        d["description"] = f"{base} with {spec['stage_set']}"
        return d
    return preset_recipe(base, key, **changes) if changes else base


def label(key: str) -> str:
    """The row's name in the table: its key, with the mode of the sequential block-wise rows and
    the preset that the W2 rows come from."""
    spec = ROWS.get(key, {})
    if key in LEGACY:
        return f"{key}: {LEGACY[key]}"
    notes = ["AWQ scales first"] if spec.get("awq_from") else []
    notes += [spec.get("mode", "corrective")] if "blockwise" in key else []
    s = spec.get("set", {})
    notes += [f"{s['iters']} steps of {s['windows_per_step']} windows, lr {s['lr']:g}"] if "iters" in s else []
    notes += {"none": ["layer errors unweighted"], "fisher-token": ["errors weighted per channel and per token"], "auto": ["weighting auto"]}.get(
        spec.get("weighting"), []
    )
    after = {"gptq": "GPTQ", "rtn": "nearest rounding", "blockwise": "blockwise at each setting"}.get(spec.get("solver"), "")
    notes += [f"plan on {spec['base']}, layer errors after {after}"] if spec.get("base") else []
    notes += [f"candidates {spec['candidates']}"] if spec.get("candidates") else []
    notes += [f"errors measured on the {spec['measure']} output"] if spec.get("measure") else []
    notes += [f"{m}: {v}" for m, v in spec.get("stage_set", {}).items()]
    notes += [f"{spec['from']} at 2 bits"] if spec.get("from") else []
    return f"{key} ({', '.join(notes)})" if notes else key


def table(res: dict) -> str:
    order = list(ROWS) + [k for k in res["rows"] if k not in ROWS]
    labels = {k: label(k) for k in order}
    return results_table(
        res, order=order, labels=labels, group=lambda k, r: ROWS[k]["class"] if k in ROWS else "W4 g64, earlier" if k in LEGACY else ""
    )


def mixed_row(rt: Resumable, key: str, spec: dict, a) -> None:
    """plan_bits under the row's ``budget`` (costs by its ``solver``, ``weighting`` and
    ``measure``) on the calibration windows, then the planned recipe; the recipe YAML is
    written beside the JSON. The row's ``base``: the plan's base recipe (default
    ``--plan-base``); its ``candidates``: default ``--candidates``."""
    from llmpress.bitplan import plan_bits
    from llmpress.recipe import load_recipe

    if rt.done(key):
        return
    budget, solver, weighting, measure = spec["budget"], spec["solver"], spec.get("weighting", "fisher"), spec.get("measure", "layer")
    base = spec.get("base") or a.plan_base
    candidates = spec.get("candidates") or a.candidates
    t = time.perf_counter()
    plan = plan_bits(
        rt.model, rt.calib, base=load_recipe(base), candidates=candidates, budget=budget, solver=solver, weighting=weighting, measure=measure
    )
    plan_s = time.perf_counter() - t
    print(plan.table(), flush=True)
    path = rt.out.with_name(f"{rt.out.stem}-{key}.yaml")
    path.write_text(plan.recipe.to_yaml())
    rt.compress(key, plan.recipe, setup_s=plan_s, plan_s=plan_s, plan_bits_per_weight=plan.bits_per_weight, plan_base=base,
                plan_solver=solver, plan_weighting=weighting, plan_measure=measure, candidates=candidates, choice=plan.choice, recipe_yaml=str(path))  # fmt: skip


def peer_row(rt: Resumable, key: str, spec: dict, a) -> None:
    """AutoRound in its own environment on the same windows; its fake-quantized linears scored here."""
    from safetensors.torch import load_file, save_file

    from llmpress.arch import get_module

    if rt.done(key):
        return
    venv = Path(a.peer_venv)
    problem = ensure_peer_venv(venv, HERE / "peer_autoround.sh", PEER_PKG)
    if problem:
        print(f"{key}: skipped, the AutoRound environment is unavailable: {problem}", flush=True)
        return
    work = rt.out.with_name(f"{rt.out.stem}-peer") / key
    work.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": rt.calib.to(torch.int64).contiguous()}, str(work / "calib.safetensors"))
    setting = PEER_SETTINGS[spec["setting"]]
    cmd = [str(venv / "bin" / "python"), str(HERE / "peer_autoround_worker.py"), "--model", str(model_folder(rt.name)), "--calib",
           str(work / "calib.safetensors"), "--bits", str(spec["bits"]), "--group-size", "64", "--iters", str(setting["iters"]),
           "--compile", a.peer_compile, "--out", str(work)] + (["--lr", str(setting["lr"])] if "lr" in setting else [])  # fmt: skip
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    process_s = time.perf_counter() - t
    (work / "worker.log").write_text(r.stdout + r.stderr)
    if r.returncode:
        print(f"{key}: skipped, the AutoRound worker exited {r.returncode} (log {work / 'worker.log'}): {r.stderr[-1500:]}", flush=True)
        return
    import json

    info = json.loads((work / "result.json").read_text())
    m = copy.deepcopy(rt.model)
    with torch.no_grad():
        for name, w in load_file(str(work / "weights.safetensors")).items():
            get_module(m, name.removesuffix(".weight")).weight.copy_(w)
    t = time.perf_counter()
    ppl = score(m, rt.sets, progress=True, desc=key)
    rt.record(key, ppl, spec["bits"] + 16 / 64, info["compress_s"], eval_s=time.perf_counter() - t, process_s=process_s,
              peer={k: v for k, v in info.items() if k != "linears"}, linears=len(info["linears"]))  # fmt: skip


def main(argv=None) -> int:
    ap = table_parser(__doc__, "learned", ROWS)
    ap.add_argument("--plan-base", default="gptq-w4g64", help="mixed rows: plan-bits --base (default gptq-w4g64)")
    ap.add_argument("--candidates", default="w2g64,w3g64,w4g64,w8g64", help="mixed rows: plan-bits --candidates")
    ap.add_argument("--peer-venv", default=str(HERE / ".venv-autoround"), help="AutoRound's environment (made when missing)")
    ap.add_argument("--peer-compile", choices=("auto", "on", "off"), default="auto", help="AutoRound's torch.compile (auto: its default)")
    a = ap.parse_args(argv)
    out = results_path(a.out, "learned", a.model)
    if a.table:
        return print_saved_table(out, table)
    keys = pick_rows(ROWS, a.rows)
    rt = Resumable(out, a.model, windows=a.windows, calib=a.calib)
    for key in keys:
        spec = ROWS[key]
        if spec["kind"] == "mixed":
            mixed_row(rt, key, spec, a)
        elif spec["kind"] == "peer":
            peer_row(rt, key, spec, a)
        elif (recipe := recipe_of(key, spec)) is None:
            print(f"{key}: skipped, no preset {spec.get('from', spec.get('name'))} in this checkout", flush=True)
        else:
            rt.compress(key, recipe, bits_class=spec["class"])
    print(table(rt.res))
    return 0


if __name__ == "__main__":
    main_guard(lambda: sys.exit(main()))
