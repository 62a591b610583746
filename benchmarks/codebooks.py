"""Codebooks (issue 18): uniform grids (RTN, GPTQ, AWQ + GPTQ) against non-uniform k-means
tables (SqueezeLLM, dense-and-sparse, GPTQ onto the tables) and vector quantization (GPTVQ) at
~4, ~3 and ~2 bits per weight, on the three test texts; and the serving speed of the
lookup-table kernel against llmpress's int4 kernel.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/codebooks.py [--model smollm2-135m] [--rows a,b] [--speed]
    .venv/bin/python benchmarks/codebooks.py --table [--out runs/bench/codebooks-smollm2-135m.json]

Each row compresses a fresh copy of the model with ``llmpress.api.compress`` (``--calib``
calibration windows of 512 tokens from the packaged Wikipedia training split, seed 0) and
measures perplexity on ``--windows`` test windows of each text (wiki, news, code). Bits per
weight are the report's (tables, scales and sparse outliers counted); compress s is the
wall time of the compress call. Rows are written to the JSON as they finish and rows already
there are skipped, so an interrupted run resumes. W2 uniform rows are built here from the W3
presets (no preset): RTN W2 g64 (full-range grid) and GPTQ W2 g64 (gptq-w3g64's settings).

``--speed``: the packed checkpoints of ``--speed-rows`` (compressed again here on the same
calibration windows, saved under ``--ckpt``) and of ``rtn-w4g64`` (the int4 kernel) served by
``load_compressed``, measured by ``llmpress bench``'s code (llmpress.bench.run: prefill of 512
tokens, greedy decode of 128 new tokens at batch 1 and 8, median of ``--repeats`` interleaved
rounds, per-layer kernel times). Codebook checkpoints run on the lookup-table kernel
(LowbitLutLinear) where it applies; VQ checkpoints on LowbitVQLinear (``vq16_mm`` for 16
codewords, ``vq8_mm`` for 32..256).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Resumable, main_guard, pick_rows, preset_recipe, print_saved_table, results_path, results_table, save_results, table_parser  # noqa: E402


def stacked(name: str, first: str, then: str | dict) -> dict:
    """The first stage of preset ``first`` (e.g. AWQ's scales, searched on its W3 g64 proxy
    grid) followed by the stages of ``then`` (a preset name or a recipe dict)."""
    a, b = preset_recipe(first), preset_recipe(then) if isinstance(then, str) else then
    return {"name": name, "description": f"{first}'s first stage, then {b['name']}", "stages": [a["stages"][0], *b["stages"]]}


# key -> (bits class, recipe: a preset name or a recipe dict)
ROWS = {
    "rtn-w4g64": ("~4", "rtn-w4g64"),
    "gptq-w4g64": ("~4", "gptq-w4g64"),
    "awq-gptq-w4g64": ("~4", "awq-gptq-w4g64"),
    "squeezellm-w4": ("~4", "squeezellm-w4"),
    "rtn-w3g64": ("~3", "rtn-w3g64"),
    "gptq-w3g64": ("~3", "gptq-w3g64"),
    "awq-gptq-w3g64": ("~3", "awq-gptq-w3g64"),
    "squeezellm-w3": ("~3", "squeezellm-w3"),
    "squeezellm-w3-sparse0.45": ("~3", "squeezellm-w3-sparse0.45"),
    "squeezellm-w3-fisher": ("~3", "squeezellm-w3-fisher"),
    "gptq-nuq-w3": ("~3", "gptq-nuq-w3"),
    "gptvq-2d-w3": ("~3", "gptvq-2d-w3"),
    "rtn-w2g64": ("~2", preset_recipe("rtn-w3g64", "rtn-w2g64", weights={"bits": 2, "full_range": True})),
    "gptq-w2g64": ("~2", preset_recipe("gptq-w3g64", "gptq-w2g64", weights={"bits": 2})),
    "gptvq-2d-w2": ("~2", "gptvq-2d-w2"),
    # the variants below keep the one EM round they were measured with (the preset's default until 2026-12-05)
    "gptvq-4d-w2-layer": ("~2", preset_recipe("gptvq-4d-w2", "gptvq-4d-w2-layer", group_size=None, table_bits=16, em_rounds=1)),
    "gptvq-4d-w2-g192": ("~2", preset_recipe("gptvq-4d-w2", "gptvq-4d-w2-g192", group_size=192, table_bits=16, em_rounds=1)),
    "gptvq-4d-w2-em1": ("~2", preset_recipe("gptvq-4d-w2", "gptvq-4d-w2-em1", em_rounds=1)),
    "gptvq-4d-w2": ("~2", "gptvq-4d-w2"),
    "gptvq-2d-w2-r64": ("~2", preset_recipe("gptvq-2d-w2", "gptvq-2d-w2-r64", row_group_size=64)),
    "awq-gptvq-4d-w2": ("~2", stacked("awq-gptvq-4d-w2", "awq-gptq-w3g64", preset_recipe("gptvq-4d-w2", "gptvq-4d-w2-em1", em_rounds=1))),
}
LABELS = {
    "rtn-w2g64": "rtn-w2g64 (rtn-w3g64 at 2 bits, full-range grid)",
    "gptq-w2g64": "gptq-w2g64 (gptq-w3g64 at 2 bits)",
    "gptvq-4d-w2-layer": "gptvq-4d-w2-layer (one float16 table per layer: the preset before 2026-12-04)",
    "gptvq-4d-w2-em1": "gptvq-4d-w2-em1 (one EM round: the preset before 2026-12-05)",
    "awq-gptvq-4d-w2": "awq-gptvq-4d-w2 (AWQ scales, then gptvq-4d-w2-em1)",
}
INT4 = "rtn-w4g64"  # the int4 kernel's checkpoint in the speed section
SPEED_ROWS = "squeezellm-w4,gptq-nuq-w3,gptvq-2d-w2,gptvq-4d-w2"


def table(res: dict) -> str:
    """The perplexity table of a codebooks JSON (ROWS' order, then any other rows), and the speed
    table when the JSON has one."""
    order = list(ROWS) + [k for k in res["rows"] if k not in ROWS]
    text = results_table(res, order=order, labels=LABELS, group=lambda k, r: ROWS[k][0] if k in ROWS else "")
    if res.get("speed"):
        text += "\n\n" + speed_table(res["speed"])
    return text


def speed_table(result: dict) -> str:
    """Prefill and decode of each packed checkpoint of an llmpress.bench result, with ratios to
    the int4 kernel's checkpoint (higher: faster)."""
    v = result["variants"]
    ref = v.get(INT4)
    bs = result["config"]["batches"]
    head = ["checkpoint", "prefill ms"] + [f"decode tok/s b={b}" for b in bs] + ["linears ms/step b=1 (head apart)", "checkpoint MB"]
    lines = [
        f"Serving (llmpress.bench, {result['environment'].get('threads')} threads; ratios: against {INT4}, the int4 kernel)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, r in v.items():
        ck = r.get("checkpoint") or {}
        mb = ck.get("file_bytes") or ck.get("computed_bytes")
        pre = f"{r['prefill_ms']:.0f}" + (f" ({ref['prefill_ms'] / r['prefill_ms']:.2f}x)" if ref else "")
        dec = [f"{r[f'decode_tok_s_b{b}']:.1f}" + (f" ({r[f'decode_tok_s_b{b}'] / ref[f'decode_tok_s_b{b}']:.2f}x)" if ref else "") for b in bs]
        lin = "-"
        if "head_ms_per_step" in r:  # the compressed linears alone: the output head is float in every checkpoint
            body = r["linears_ms_per_step"] - r["head_ms_per_step"]
            ref_body = ref["linears_ms_per_step"] - ref["head_ms_per_step"] if ref and "head_ms_per_step" in ref else None
            lin = f"{body:.2f}" + (f" ({ref_body / body:.2f}x)" if ref_body else "") + f" + {r['head_ms_per_step']:.2f}"
        lines.append("| " + " | ".join([name, pre, *dec, lin, f"{mb / 1e6:.1f}" if mb else "-"]) + " |")
    return "\n".join(lines)


def speed(rt: Resumable, keys: list[str], ckpt: Path, repeats: int) -> dict:
    """Save the packed checkpoints of ``keys`` and INT4 (compressed on ``rt``'s calibration
    windows, kept under ``ckpt``) and run llmpress.bench on them against the model."""
    from llmpress import api, bench
    from llmpress.export.packed_load import read_manifest

    dirs = []
    for key in [INT4, *[k for k in keys if k != INT4]]:
        d = ckpt / key
        if read_manifest(d) is None:
            print(f"speed: making {d}", flush=True)
            m = copy.deepcopy(rt.model)
            r = api._as_recipe(ROWS[key][1])
            rep = api.compress(m, r, rt.calib if api.needs_calibration(r) else None, tokenizer=rt.tok, calib=rt.calib_cfg)
            api.save(m, rt.tok, d, report=rep, overwrite=True)
            del m
        dirs.append(str(d))
    cfg = bench.BenchConfig(repeats=repeats, memory_probe=False)
    result = bench.run(dirs, rt.name, cfg, progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    rt.res["speed"] = result
    save_results(rt.out, rt.res)
    return result


def main(argv=None) -> int:
    ap = table_parser(__doc__, "codebooks", ROWS)
    ap.add_argument("--speed", action="store_true", help="also the serving section (see above)")
    ap.add_argument("--speed-rows", default=SPEED_ROWS, help=f"rows whose checkpoints are served (default {SPEED_ROWS})")
    ap.add_argument("--speed-only", action="store_true", help="only the serving section (no perplexity rows)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the speed section")
    ap.add_argument("--ckpt", help="folder of the speed section's checkpoints (default runs/bench/codebooks-ckpt-MODEL)")
    ap.add_argument("--save-ckpt", action="store_true", help="save each row's packed checkpoint under --ckpt (the speed section then reuses it)")
    a = ap.parse_args(argv)
    out = results_path(a.out, "codebooks", a.model)
    if a.table:
        return print_saved_table(out, table)
    keys = pick_rows(ROWS, a.rows)
    speed_keys = pick_rows(ROWS, a.speed_rows) if a.speed or a.speed_only else []
    rt = Resumable(out, a.model, windows=a.windows, calib=a.calib)
    ckpt = Path(a.ckpt or f"runs/bench/codebooks-ckpt-{Path(a.model).name}")
    for key in [] if a.speed_only else keys:
        rt.compress(key, ROWS[key][1], bits_class=ROWS[key][0], save_to=ckpt / key if a.save_ckpt else None)
    if speed_keys:
        speed(rt, speed_keys, ckpt, a.repeats)
    print(table(rt.res))
    return 0


if __name__ == "__main__":
    main_guard(lambda: sys.exit(main()))
