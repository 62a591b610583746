"""Every calibrated method on three kinds of text: calibrated on one source (or a mix), scored on
the packaged Wikipedia test split, the packaged news text and Python code (torch.nn's source).

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/domains.py --calib wiki \
        --presets rtn-w4g64,gptq-w4g64,awq-w4g64 --out runs/bench/domains-wiki.json

Each row compresses a fresh copy of the model with ``llmpress.api.compress`` (the public entry
point, the same windows as ``llmpress compress``: 128 calibration windows of 512 tokens, seed 0)
and measures perplexity on each source's test windows (``--eval-windows`` per source; news
has 25). Besides the presets, ``--variants`` names settings of the GPTQ study (VARIANTS below).
Results are appended to the JSON as each row finishes, and rows already there are skipped, so
an interrupted run resumes. ``--table`` prints the table of an existing JSON.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cells, eval_sets, preset_recipe  # noqa: E402
from common import load_results as _load  # noqa: E402
from common import save_results as _save  # noqa: E402

from llmpress import api, models
from llmpress.calib.engine import EngineOptions
from llmpress.eval.perplexity import perplexity

W4 = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 64, "observer": "minmax", "full_range": True}


def _gptq(**kw) -> dict:
    return {"name": "variant", "stages": [{"method": "gptq", "targets": ["Linear"], "ignore": ["lm_head"], "weights": W4,
                                           "block_size": 128, "damp": 0.01, **kw}]}  # fmt: skip


def gptq_as_rtn(preset: str) -> dict:
    """``preset`` with its GPTQ stage rounded to nearest instead (same targets, weights and
    activations): the data-free counterpart of a rotation + GPTQ preset."""
    d = preset_recipe(preset, f"{preset}-as-rtn")
    keep = ("targets", "ignore", "weights", "activations")
    d["stages"] = [{"method": "rtn", **{k: st[k] for k in keep if k in st}} if st["method"] == "gptq" else st for st in d["stages"]]
    d["description"] = f"{preset} with round-to-nearest in place of GPTQ"
    return d


def kmix_data_free(preset: str) -> dict:
    """The data-free counterpart of an ``awq-gptq-<gguf type>`` preset: the same per-tensor
    GGUF types (its ``gguf_mix`` stage), without AWQ's scales, each type's grid searched
    without an importance matrix and rounded to nearest (``kquant`` ``solver: round``): what
    ``llama-quantize`` writes without an imatrix."""
    d = preset_recipe(preset, f"{preset}-data-free")
    gptq_fields = ("block_size", "damp", "act_order")  # the GPTQ solver's, unused when rounding
    d["stages"] = [{**{k: v for k, v in st.items() if k not in gptq_fields}, "importance": False, "solver": "round"} if st["method"] == "kquant" else st
                   for st in d["stages"] if st["method"] != "awq"]  # fmt: skip
    d["description"] = f"{preset} without calibration data: no AWQ scales, no importance, rounded to nearest"
    return d


KMIX_PRESETS = ("awq-gptq-q4_k_m", "awq-gptq-q4_k_s", "awq-gptq-q5_k_m", "awq-gptq-q3_k_m", "awq-gptq-q2_k", "awq-gptq-iq4_xs")
# every preset with a GPTQ sweep (a gptq stage, or kquant's gptq solver): ``<preset>-shrink<s>`` is the
# preset with that stage's Hessian shrunk toward its diagonal (the held-out rule's candidates)
GPTQ_PRESETS = (
    "gptq-w4g64", "gptq-w3g64", "gptq-q4_0", "gptq-q4_0-head8", "gptq-q5_0", "awq-gptq-w4g64", "awq-gptq-w3g64",
    "awq-gptq-q4_0", "awq-gptq-q4_0-head8", "awq-gptq-q4_0-head8-lsq", *KMIX_PRESETS, "prune-mlp-20-gptq-w4g64",
    "quarot-w4a4kv4-gptq", "duquant-w4a4kv4-gptq", "spinquant-w4a4kv4-gptq",
)  # fmt: skip


# the presets with a SparseGPT sweep: the same Hessian shrinkage (sparsegpt's ``shrink``)
SPARSEGPT_PRESETS = ("sparsegpt-50", "sparsegpt-2of4", "sparsegpt-50-w4g64")


def with_shrink(preset: str, shrink: float) -> dict:
    """``preset`` with its GPTQ (or SparseGPT) sweep's Hessian shrunk toward the diagonal by ``shrink``."""
    method = "kquant" if preset in KMIX_PRESETS else "sparsegpt" if preset in SPARSEGPT_PRESETS else "gptq"
    d = preset_recipe(preset, f"{preset}-shrink{shrink:g}", only=method, shrink=shrink)
    d["description"] = f"{preset} with its {method} stage's Hessian shrunk {shrink:g} toward the diagonal"
    return d


def _rotation_gptq_variants(preset: str) -> dict:
    """The act-order / damping variants of a rotation + GPTQ preset, and its RTN counterpart."""
    v = {f"{preset}-{tag}": (preset_recipe(preset, "variant", only="gptq", act_order=ao, static_groups=True, damp=d), {})
         for tag, ao, d in (("natural", False, 0.01), ("act-order", True, 0.01), ("act-order-damp0.3", True, 0.3))}  # fmt: skip
    v[f"{preset}-as-rtn"] = (gptq_as_rtn(preset), {})
    return v


SHRINKS = (0.1, 0.2, 0.35, 0.5, 0.75)
# name -> (recipe, engine options): the knobs of issue 22's GPTQ study
# fmt: off
VARIANTS = {
    "rtn-w4g64-full-range": ({"name": "variant", "stages": [{"method": "rtn", "targets": ["Linear"], "ignore": ["lm_head"], "weights": W4}]}, {}),
    "rtn-w3g64-full-range": ({"name": "variant", "stages": [{"method": "rtn", "targets": ["Linear"], "ignore": ["lm_head"],
                                                              "weights": {**W4, "bits": 3}}]}, {}),
    "gptq-natural": (_gptq(act_order=False), {}),
    "gptq-act-order": (_gptq(act_order=True), {}),
    "gptq-natural-damp0.1": (_gptq(act_order=False, damp=0.1), {}),
    "gptq-act-order-damp0.1": (_gptq(act_order=True, damp=0.1), {}),
    "gptq-natural-block32": (_gptq(act_order=False, block_size=32), {}),
    "gptq-natural-dynamic-groups": (_gptq(act_order=False, static_groups=False), {}),
    "gptq-natural-restricted-grid": (_gptq(act_order=False, weights={**W4, "full_range": False}), {}),
    # shrinkage toward the diagonal (H <- (1 - s) H + s diag H), alone (damp 0.01) and with damping, W4 and W3
    **{f"gptq-act-order-shrink{s:g}": (_gptq(act_order=True, shrink=s), {}) for s in SHRINKS},
    **{f"gptq-act-order-damp{d:g}-shrink{s:g}": (_gptq(act_order=True, damp=d, shrink=s), {}) for d in (0.3, 1.0) for s in SHRINKS},
    **{f"gptq-w3-act-order-shrink{s:g}": (_gptq(act_order=True, shrink=s, weights={**W4, "bits": 3}), {}) for s in SHRINKS},
    **{f"gptq-w3-act-order-damp{d:g}-shrink{s:g}": (_gptq(act_order=True, damp=d, shrink=s, weights={**W4, "bits": 3}), {})
       for d in (0.3, 1.0) for s in SHRINKS},
    "gptq-act-order-damp0.3": (_gptq(act_order=True, damp=0.3), {}),
    "gptq-act-order-damp1": (_gptq(act_order=True, damp=1.0), {}),
    "gptq-w3-act-order-damp1": (_gptq(act_order=True, damp=1.0, weights={**W4, "bits": 3}), {}),
    "gptq-act-order-floor0.1": (_gptq(act_order=True, diag_floor=0.1), {}),
    "gptq-act-order-floor0.3": (_gptq(act_order=True, diag_floor=0.3), {}),
    "awq-gptq-w4g64-damp0.3": ({"name": "variant", "stages": [
        {"method": "awq", "targets": ["Linear"], "ignore": ["lm_head"], "weights": W4, "quantize": False, "grid": 20, "search_windows": 8, "clip": False},
        {"method": "gptq", "targets": ["Linear"], "ignore": ["lm_head"], "weights": W4, "block_size": 128, "damp": 0.3, "act_order": True}]}, {}),
    "gptq-w3-act-order-damp0.3": (_gptq(act_order=True, damp=0.3, weights={**W4, "bits": 3}), {}),
    "awq-gptq-w3g64-damp0.3": ({"name": "variant", "stages": [
        {"method": "awq", "targets": ["Linear"], "ignore": ["lm_head"], "weights": {**W4, "bits": 3}, "quantize": False, "grid": 20, "search_windows": 8, "clip": False},
        {"method": "gptq", "targets": ["Linear"], "ignore": ["lm_head"], "weights": {**W4, "bits": 3}, "block_size": 128, "damp": 0.3, "act_order": True}]}, {}),
    "awq-gptq-w3g64-damp1": ({"name": "variant", "stages": [
        {"method": "awq", "targets": ["Linear"], "ignore": ["lm_head"], "weights": {**W4, "bits": 3}, "quantize": False, "grid": 20, "search_windows": 8, "clip": False},
        {"method": "gptq", "targets": ["Linear"], "ignore": ["lm_head"], "weights": {**W4, "bits": 3}, "block_size": 128, "damp": 1.0, "act_order": True}]}, {}),
    "awq-gptq-w4g64-damp0.3-down-rtn": ({"name": "variant", "stages": [
        {"method": "awq", "targets": ["Linear"], "ignore": ["lm_head"], "weights": W4, "quantize": False, "grid": 20, "search_windows": 8, "clip": False},
        {"method": "gptq", "targets": ["Linear"], "ignore": ["lm_head", "re:.*down_proj"], "weights": W4, "block_size": 128, "damp": 0.3, "act_order": True},
        {"method": "rtn", "targets": ["re:.*down_proj"], "weights": W4}]}, {}),
    "awq-gptq-w4g64-damp0.3-down-damp1": ({"name": "variant", "stages": [
        {"method": "awq", "targets": ["Linear"], "ignore": ["lm_head"], "weights": W4, "quantize": False, "grid": 20, "search_windows": 8, "clip": False},
        {"method": "gptq", "targets": ["Linear"], "ignore": ["lm_head", "re:.*down_proj"], "weights": W4, "block_size": 128, "damp": 0.3, "act_order": True},
        {"method": "gptq", "targets": ["re:.*down_proj"], "weights": W4, "block_size": 128, "damp": 1.0, "act_order": True}]}, {}),
    "gptq-act-order-damp0.3-down-rtn": ({"name": "variant", "stages": [
        {"method": "gptq", "targets": ["Linear"], "ignore": ["lm_head", "re:.*down_proj"], "weights": W4, "block_size": 128, "damp": 0.3, "act_order": True},
        {"method": "rtn", "targets": ["re:.*down_proj"], "weights": W4}]}, {}),
    "sparsegpt-50-damp0.3": ({"name": "variant", "stages": [
        {"method": "sparsegpt", "targets": ["Linear"], "ignore": ["lm_head"], "sparsity": 0.5, "block_size": 128, "damp": 0.3, "per_row": True, "refit": True}]}, {}),
    # the pruning table's SparseGPT ablations: the paper's block-wide masks, per-row masks without the refit
    "sparsegpt-50-block-masks": (preset_recipe("sparsegpt-50", "variant", per_row=False, refit=False), {}),
    "sparsegpt-50-no-refit": (preset_recipe("sparsegpt-50", "variant", refit=False), {}),
    "sparsegpt-2of4-no-refit": (preset_recipe("sparsegpt-2of4", "variant", refit=False), {}),
    **_rotation_gptq_variants("quarot-w4a4kv4-gptq"),
    **_rotation_gptq_variants("duquant-w4a4kv4-gptq"),
    **_rotation_gptq_variants("spinquant-w4a4kv4-gptq"),
    **{f"{p}-data-free": (kmix_data_free(p), {}) for p in KMIX_PRESETS},
    **{f"{p}-shrink{x:g}": (with_shrink(p, x), {}) for p in GPTQ_PRESETS + SPARSEGPT_PRESETS for x in SHRINKS},
    # AWQ + GPTQ W3 with gptq-w3g64's regularization (damp 0.3, shrink 0.5) in place of damp 1
    "awq-gptq-w3g64-damp0.3-shrink0.5": (preset_recipe("awq-gptq-w3g64", "variant", only="gptq", damp=0.3, shrink=0.5), {}),
    # qsvd-80's data-free counterpart: plain truncated SVD of q, k and v, each to 80% of its parameters
    "qkv-svd-80": ({"name": "variant", "stages": [{"method": "svd", "targets": ["re:.*self_attn\\.(q|k|v)_proj$"], "ratio": 0.8}]}, {}),
    # AdaRound's Hessian damped as GPTQ's (issue 22: undamped, adaround-w4g64 lost to RTN on code)
    **{f"adaround-w4g64-damp{d:g}": (preset_recipe("adaround-w4g64", "variant", only="adaround", damp=d), {}) for d in (0.0, 0.3, 1.0)},
    "gptq-natural-unfused": (_gptq(act_order=False), {"fused": False}),
    "gptq-natural-fp-inputs": (_gptq(act_order=False), {"true_sequential": False}),
}
# fmt: on


PEER_ROW = "llm-compressor 0.14 GPTQ W4 g64 (actorder static)"


def _rotation_readme_rows(preset: str, name: str, rtn_label: str, *, chosen: str = "natural") -> dict:
    """README rows of ``_rotation_gptq_variants(preset)``; ``chosen`` is the variant the preset now is
    (the natural-order row was every preset before the held-out rule chose)."""
    rtn = f"{preset}-as-rtn"
    rows = {"natural": "natural order, damp 0.01", "act-order": "activation order, damp 0.01", "act-order-damp0.3": "activation order, damp 0.3"}
    out = {rtn: (rtn_label, None)}
    for tag, what in rows.items():
        label = f"{name} + GPTQ W4A4KV4, {what}"
        if tag == chosen:
            label = f"**{label} (`{preset}`)**"
        elif tag == "natural":
            label += f" (`{preset}` until 2026-12-05)"
        out[f"{preset}-{tag}"] = (label, rtn)
    return out


# README rows: key in the JSON -> (label, key of the data-free counterpart or None). Presets are
# named by their preset; variants say what they change.
README_ROWS = {
    "rtn-w4g64": ("RTN W4 g64, restricted grid (`rtn-w4g64`; AWQ's counterpart)", None),
    "rtn-w4g64-full-range": ("RTN W4 g64, full-range grid (GPTQ's counterpart)", None),
    "gptq-natural": ("GPTQ W4 g64, natural order, damp 0.01 (the old `gptq-w4g64`)", "rtn-w4g64-full-range"),
    "gptq-act-order": ("GPTQ W4 g64, activation order, damp 0.01", "rtn-w4g64-full-range"),
    "gptq-act-order-damp0.1": ("GPTQ W4 g64, activation order, damp 0.1", "rtn-w4g64-full-range"),
    "gptq-act-order-damp0.3": ("GPTQ W4 g64, activation order, damp 0.3 (`gptq-w4g64` until 2026-12-06)", "rtn-w4g64-full-range"),
    **{f"gptq-act-order-shrink{x:g}": (f"GPTQ W4 g64, activation order, damp 0.01, shrink {x:g}", "rtn-w4g64-full-range") for x in SHRINKS},
    **{
        f"gptq-act-order-damp{d:g}-shrink{x:g}": (f"GPTQ W4 g64, activation order, damp {d:g}, shrink {x:g}", "rtn-w4g64-full-range")
        for d in (0.3, 1.0)
        for x in SHRINKS
    },
    "gptq-act-order-shrink0.5": ("**GPTQ W4 g64, activation order, damp 0.01, shrink 0.5 (`gptq-w4g64`)**", "rtn-w4g64-full-range"),
    "gptq-act-order-damp1": ("GPTQ W4 g64, activation order, damp 1", "rtn-w4g64-full-range"),
    "gptq-act-order-damp0.3-down-rtn": ("GPTQ W4 g64, activation order, damp 0.3, `down_proj` rounded to nearest", "rtn-w4g64-full-range"),
    PEER_ROW: ("llm-compressor 0.14 GPTQ W4 g64 (actorder static, damp 0.01), same windows", "rtn-w4g64-full-range"),
    "awq-w4g64": ("**AWQ W4 g64 (`awq-w4g64`)**", "rtn-w4g64"),
    "awq-gptq-w4g64": ("AWQ scales + GPTQ W4 g64, damp 0.01 (the old `awq-gptq-w4g64`)", "rtn-w4g64-full-range"),
    "awq-gptq-w4g64-damp0.3": (
        "AWQ scales + GPTQ W4 g64, damp 0.3 (`awq-gptq-w4g64` until 2026-12-06: now with shrink 0.5, below)",
        "rtn-w4g64-full-range",
    ),
    "awq-gptq-w4g64-damp0.3-down-rtn": ("AWQ scales + GPTQ W4 g64 damp 0.3, `down_proj` rounded to nearest", "rtn-w4g64-full-range"),
    "awq-gptq-w4g64-damp0.3-down-damp1": ("AWQ scales + GPTQ W4 g64 damp 0.3, `down_proj` at damp 1", "rtn-w4g64-full-range"),
    "rtn-w3g64": ("RTN W3 g64, restricted grid (`rtn-w3g64`; AWQ's counterpart)", None),
    "rtn-w3g64-full-range": ("RTN W3 g64, full-range grid (GPTQ's counterpart)", None),
    "gptq-w3g64": ("GPTQ W3 g64, damp 0.01 (the old `gptq-w3g64`)", "rtn-w3g64-full-range"),
    "gptq-w3-act-order-damp0.3": ("GPTQ W3 g64, damp 0.3", "rtn-w3g64-full-range"),
    "gptq-w3-act-order-damp1": ("GPTQ W3 g64, damp 1 (`gptq-w3g64` until 2026-12-06)", "rtn-w3g64-full-range"),
    **{f"gptq-w3-act-order-shrink{x:g}": (f"GPTQ W3 g64, damp 0.01, shrink {x:g}", "rtn-w3g64-full-range") for x in SHRINKS},
    **{
        f"gptq-w3-act-order-damp{d:g}-shrink{x:g}": (f"GPTQ W3 g64, damp {d:g}, shrink {x:g}", "rtn-w3g64-full-range")
        for d in (0.3, 1.0)
        for x in SHRINKS
    },
    "gptq-w3-act-order-damp0.3-shrink0.5": ("**GPTQ W3 g64, damp 0.3, shrink 0.5 (`gptq-w3g64`)**", "rtn-w3g64-full-range"),
    "awq-w3g64": ("**AWQ W3 g64 (`awq-w3g64`)**", "rtn-w3g64"),
    "awq-gptq-w3g64": ("AWQ scales + GPTQ W3 g64, damp 0.01 (the old `awq-gptq-w3g64`)", "rtn-w3g64-full-range"),
    "awq-gptq-w3g64-damp0.3": ("AWQ scales + GPTQ W3 g64, damp 0.3", "rtn-w3g64-full-range"),
    "awq-gptq-w3g64-damp0.3-shrink0.5": ("AWQ scales + GPTQ W3 g64, damp 0.3, shrink 0.5", "rtn-w3g64-full-range"),
    "awq-gptq-w3g64-damp1": (
        "**AWQ scales + GPTQ W3 g64, damp 1 (`awq-gptq-w3g64` until 2026-12-06: now damp 0.3 + shrink 0.5, below)**",
        "rtn-w3g64-full-range",
    ),
    "rtn-w8a8": ("RTN W8A8, per-token activations (`rtn-w8a8`)", None),
    "smoothquant-w8a8": ("SmoothQuant W8A8 (`smoothquant-w8a8`)", "rtn-w8a8"),
    "quarot-w4a4kv4-rtn": ("QuaRot + RTN W4A4KV4 (`quarot-w4a4kv4-rtn`)", None),
    # the JSONs of 2026-12-01 hold the preset as it was then (natural order, damp 0.01), as for gptq-w3g64 above
    "quarot-w4a4kv4-gptq": ("QuaRot + GPTQ W4A4KV4, natural order, damp 0.01 (the old `quarot-w4a4kv4-gptq`)", "quarot-w4a4kv4-rtn"),
    "quarot-w4a4kv4-gptq-natural": ("QuaRot + GPTQ W4A4KV4, natural order, damp 0.01 (the old `quarot-w4a4kv4-gptq`)", "quarot-w4a4kv4-rtn"),
    "quarot-w4a4kv4-gptq-act-order": ("QuaRot + GPTQ W4A4KV4, activation order, damp 0.01", "quarot-w4a4kv4-rtn"),
    "quarot-w4a4kv4-gptq-act-order-damp0.3": ("**QuaRot + GPTQ W4A4KV4, activation order, damp 0.3 (`quarot-w4a4kv4-gptq`)**", "quarot-w4a4kv4-rtn"),
    # DuQuant's and SpinQuant's GPTQ presets and their counterparts (the same stages, RTN in place of GPTQ)
    **_rotation_readme_rows(
        "duquant-w4a4kv4-gptq", "DuQuant", "DuQuant + RTN W4A4KV4, clipped as `duquant-w4a4kv4-gptq`", chosen="act-order-damp0.3"
    ),
    **_rotation_readme_rows("spinquant-w4a4kv4-gptq", "SpinQuant", "SpinQuant + RTN W4A4KV4 (`spinquant-w4a4kv4`)"),
    "magnitude-50": ("magnitude 50% (`magnitude-50`)", None),
    "wanda-50": ("Wanda 50% (`wanda-50`)", "magnitude-50"),
    "sparsegpt-50": ("SparseGPT 50%, damp 0.01 (`sparsegpt-50`)", "magnitude-50"),
    "sparsegpt-50-damp0.3": ("SparseGPT 50%, damp 0.3", "magnitude-50"),
    "sparsegpt-50-block-masks": ("SparseGPT 50%, block-wide masks, no refit (the paper)", "magnitude-50"),
    "sparsegpt-50-no-refit": ("SparseGPT 50%, per-row masks, no refit", "magnitude-50"),
    "magnitude-2of4": ("magnitude 2:4 (`magnitude-2of4`)", None),
    "wanda-2of4": ("Wanda 2:4 (`wanda-2of4`)", "magnitude-2of4"),
    "sparsegpt-2of4": ("SparseGPT 2:4 + refit (`sparsegpt-2of4`)", "magnitude-2of4"),
    "sparsegpt-2of4-no-refit": ("SparseGPT 2:4, no refit", "magnitude-2of4"),
    "sparsegpt-50-w4g64": ("SparseGPT 50% + W4 g64 in one pass (`sparsegpt-50-w4g64`)", None),
    "adaround-w4g64-damp0": ("AdaRound W4 g64, undamped (`adaround-w4g64` until 2026-12-06)", "rtn-w4g64-full-range"),
    "adaround-w4g64-damp0.3": ("AdaRound W4 g64, damp 0.3", "rtn-w4g64-full-range"),
    "adaround-w4g64-damp1": ("AdaRound W4 g64, damp 1 (as `adaround-w4g64`)", "rtn-w4g64-full-range"),
    "adaround-w4g64": ("**AdaRound W4 g64, damp 1 (`adaround-w4g64`)**", "rtn-w4g64-full-range"),
}


def readme_table(res: dict, keys=None) -> str:
    """The README's table: README_ROWS present in ``res`` (in that order, or ``keys``), each with
    the texts where it beats its data-free counterpart (lower ppl)."""
    fp = res["fp"]
    lines = [f"| method (calibrated on {res.get('calib')}) | " + " | ".join(fp) + " | beats its data-free counterpart on |",
             "|---|" + "---|" * (len(fp) + 1)]  # fmt: skip
    for k in keys or README_ROWS:
        if k not in res["rows"]:
            continue
        label, ref = README_ROWS.get(k, (k, None))
        row = res["rows"][k]["ppl"]
        beats = ""
        if ref is not None and ref in res["rows"]:
            won = [s for s in fp if row[s] < res["rows"][ref]["ppl"][s]]
            beats = "all three" if len(won) == len(fp) == 3 else (", ".join(won) or "none")
        lines.append(f"| {label} | " + " | ".join(cells(row, fp)) + f" | {beats} |")
    return "\n".join(lines)


# preset -> its row in the Wikipedia-calibrated JSON (the presets' settings were measured there as variants)
PRESET_ROWS = {"gptq-w4g64": "gptq-act-order-damp0.3", "awq-gptq-w4g64": "awq-gptq-w4g64-damp0.3", "gptq-w3g64": "gptq-w3-act-order-damp1",
               "awq-gptq-w3g64": "awq-gptq-w3g64-damp1"}  # fmt: skip


def mix_table(mix: dict, wiki: dict) -> str:
    """Each preset of ``mix`` (calibrated on a mix) under its Wikipedia-calibrated row of ``wiki``
    (same test windows), with the held-out texts' change."""
    fp = mix["fp"]
    held = [s for s in fp if s not in mix["calib"].split(",")]
    lines = ["| preset | calibration | " + " | ".join(fp) + " |", "|---|---|" + "---|" * len(fp)]
    for k, row in mix["rows"].items():
        ref = wiki["rows"].get(PRESET_ROWS.get(k, k))
        if ref is not None:
            lines.append(f"| `{k}` | {wiki.get('calib')} | " + " | ".join(cells(ref["ppl"], fp)) + " |")
        lines.append(f"| `{k}` | {mix['calib']} ({', '.join(held)} held out) | " + " | ".join(cells(row["ppl"], fp)) + " |")
    return "\n".join(lines)


def table(res: dict) -> str:
    sources = list(res["fp"])
    sized = any(r.get("size_mb") is not None for r in res["rows"].values())  # rows since the size column exists
    head = "| method | " + " | ".join(f"{s} ppl (x fp)" for s in sources) + " | bits/weight |" + (" size MB |" if sized else "")
    lines = [f"calibration: {res.get('calib')}; fp32: " + ", ".join(f"{s} {v:.3f}" for s, v in res["fp"].items()), "", head,
             "|---|" + "---|" * (len(sources) + 1 + sized)]  # fmt: skip
    for name, r in res["rows"].items():
        size = (f" {r['size_mb']:.1f} |" if r.get("size_mb") is not None else " - |") if sized else ""
        lines.append(f"| {name} | " + " | ".join(cells(r["ppl"], res["fp"])) + f" | {r.get('bits_per_weight', 0):.3f} |" + size)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wiki", help="calibration source or mix (a --calib-data value)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--fp-from", help="a JSON of this script with the same test windows: reuse its full-precision figures")
    ap.add_argument("--eval", default="wiki,news,code")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--presets", default="", help="comma list of preset names")
    ap.add_argument("--variants", default="", help=f"comma list of: {', '.join(VARIANTS)}")
    ap.add_argument("--peer", action="store_true", help="also llm-compressor's GPTQ W4 g64 (actorder static) on the same windows")
    ap.add_argument("--out", default="runs/bench/domains.json")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--also", nargs="*", default=[], help="with --table: JSONs of other runs on the same windows whose rows join the table")
    ap.add_argument("--readme", action="store_true", help="with --table: the README's labels and counterpart column")
    ap.add_argument(
        "--mix-table", help="with --table: print --out's presets (calibrated on a mix) against their rows in this Wikipedia-calibrated JSON"
    )
    a = ap.parse_args(argv)
    out = Path(a.out)
    res = _load(out)
    if a.table and a.mix_table:
        print(mix_table(res, _load(Path(a.mix_table))))
        return 0
    if a.table:
        for f in a.also:  # rows of other runs on the same test windows (e.g. the --peer run)
            other = _load(Path(f))
            if other.get("windows") != res.get("windows") or any(abs(other["fp"][s] - v) > 1e-9 * v for s, v in res["fp"].items()):
                raise SystemExit(f"{f} was scored on other test windows")
            res["rows"].update({k: v for k, v in other["rows"].items() if k not in res["rows"]})
        print(readme_table(res) if a.readme else table(res))
        return 0
    res.update(calib=a.calib, calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen, eval_windows=a.eval_windows, model=a.model)
    model, tok = models.load(a.model)
    sources = a.eval.split(",")
    windows = eval_sets(tok, model, a.eval, a.eval_windows)
    res["windows"] = {s: int(w.shape[0]) for s, w in windows.items()}
    if a.fp_from:
        old = _load(Path(a.fp_from))
        if old.get("windows") != res["windows"] or old.get("eval_windows") != a.eval_windows:
            raise SystemExit(f"{a.fp_from} was scored on other test windows")
        res["fp"] = {s: old["fp"][s] for s in sources if s in old["fp"]}
    for s in sources:
        if s not in res["fp"]:
            res["fp"][s] = perplexity(model, windows[s], 1, True, f"fp32 {s}")
            _save(out, res)
    cfg = api.CalibConfig(source=a.calib, n_samples=a.calib_samples, seqlen=a.calib_seqlen)
    calib = None
    jobs = [(p, p, {}) for p in filter(None, a.presets.split(","))]
    jobs += [(v, *VARIANTS[v]) for v in filter(None, a.variants.split(","))]
    for name, recipe, engine_kw in jobs:
        if name in res["rows"]:
            continue
        if calib is None and api.needs_calibration(recipe):
            calib = api.calibration_windows(tok, model, cfg)
        m = copy.deepcopy(model)
        t = time.perf_counter()
        rep = api.compress(m, recipe, calib if api.needs_calibration(recipe) else None, tokenizer=tok, calib=cfg,
                           engine=EngineOptions(**engine_kw))  # fmt: skip
        row = {"compress_s": time.perf_counter() - t, "bits_per_weight": rep.bits_per_weight, "size_mb": rep.size_mb, "ppl": {},
               "threads": torch.get_num_threads()}  # fmt: skip
        for s in sources:
            row["ppl"][s] = perplexity(m, windows[s], 1, False)
        res["rows"][name] = row
        _save(out, res)
        print(f"{name}: " + ", ".join(f"{s} {v:.3f} ({v / res['fp'][s]:.3f}x)" for s, v in row["ppl"].items())
              + f"  compress {row['compress_s']:.0f}s", flush=True)  # fmt: skip
        del m
    if a.peer and PEER_ROW not in res["rows"]:
        res["rows"][PEER_ROW] = peer_row(a.model, calib if calib is not None else api.calibration_windows(tok, model, cfg), windows, out)
        _save(out, res)
    print(table(res))
    return 0


def peer_row(model_name: str, calib: torch.Tensor, windows: dict, out: Path) -> dict:
    """llm-compressor in its own environment on the same calibration and test windows."""
    import numpy as np
    from gptq_vs_peer import ensure_peer_venv, run_peer

    problem = ensure_peer_venv()
    if problem:
        raise SystemExit(f"peer unavailable: {problem}")
    work = out.parent / (out.stem + "-peer")
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "calib.npy", calib.numpy().astype(np.int64))
    evals = {}
    for s, w in windows.items():
        evals[s] = work / f"{s}.npy"
        np.save(evals[s], w.numpy().astype(np.int64))
    folder = models.packaged_folder(model_name) if model_name in models.PACKAGED else Path(model_name)
    r = run_peer(folder, work / "calib.npy", evals, 4, 64, "static", work / "peer-w4.json")
    if "error" in r:
        raise SystemExit(r["error"])
    return {"compress_s": r["compress_s"], "bits_per_weight": 4.25, "ppl": r["ppl_by_source"], "threads": r.get("threads")}


if __name__ == "__main__":
    sys.exit(main())
