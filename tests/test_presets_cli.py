"""Every preset from the command line, as a user runs it, and its checkpoint served back.

For each preset `llmpress recipes` lists (iterated, never a hand-kept list):
``llmpress compress smollm2-135m --recipe P --out OUT --json R.json`` with default flags
(progress bars on, default save format), run through ``llmpress.cli.main`` in-process
(the subprocess entry point is covered by tests/test_readme_commands.py), with the test
shrink (llmpress/shrink.py) pointing the alias at a tiny random llama and capping the
windows (4 of 32 tokens). Then:

- exit code 0, a packed checkpoint (the default format);
- the same preset applied in-process through ``llmpress.compress`` to the same tiny model
  (same calibration windows and seed: the defaults the CLI uses) gives the perplexity the
  report states (to 1e-4 relative), and a model that the checkpoint reproduces:
  ``load_compressed(OUT, backend="dequant")`` (the exact dequantize-then-matmul path)
  gives its logits to 1e-5 x max |logit|; ``load_compressed(OUT)`` (the default backend
  a user gets: CPU kernels, integer GEMMs) gives each linear's output on the in-memory
  model's own inputs to 1e-5 x that layer's max |output|. Whole-model logits of the
  default backend are not compared tightly: an integer-activation layer (``Int8Linear``)
  recomputes the per-token codes from its input, and an input one float32 ulp away from
  the fake-quant model's can round to the neighbouring code; those flips compound over
  the layers (measured on the tiny W8A8 model: 1.8e-3 x max |logit| end to end while every
  layer agrees to 4e-7);
- the report: finite baseline and compressed perplexity, bits per weight within
  [b, b + 1] for a preset whose weights have b bits (16 without weight quantization),
  stage times, peak RSS, the recipe and model names, and the shrink recorded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields

import pytest
import torch
import torch.nn as nn
from conftest import shrink_env

import llmpress
from llmpress import cli
from llmpress.api import EvalConfig, evaluation_windows
from llmpress.arch import get_module
from llmpress.eval.perplexity import perplexity
from llmpress.export import runtime_state
from llmpress.export.packed import FORMAT, FORMAT_V1
from llmpress.export.packed_load import read_manifest
from llmpress.quant.args import QuantArgs
from llmpress.recipe import load_recipe, presets

LOGIT_RTOL = 1e-5  # of the largest |logit|: the exact backend
LAYER_RTOL = 1e-5  # of the layer's largest |output|: the default backend, layer by layer
PPL_RTOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads; on a shared 2-core runner OpenMP spinning cost
    this file 4 minutes instead of 20 s (measured). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shrunk(tiny_alias_folders, monkeypatch):
    for k, v in shrink_env(tiny_alias_folders).items():
        monkeypatch.setenv(k, v)


def weight_bits(preset: str) -> int | None:
    """The fewest weight bits any stage of ``preset`` stores (None: weights stay 16-bit)."""
    bits = []
    for st in load_recipe(preset).stages:
        for f in fields(st.config):
            v = getattr(st.config, f.name)
            if f.name == "bits" and isinstance(v, int) and not isinstance(v, bool):  # codebook methods: 2^bits table entries
                bits.append(v)
            if not f.name.endswith("weights"):
                continue
            if isinstance(v, QuantArgs):
                bits.append(v.bits)
            elif isinstance(v, str) and (m := re.fullmatch(r"int(\d+)", v)):
                bits.append(int(m.group(1)))
    return min(bits) if bits else None


LOWRANK = ("svd", "asvd", "svd_llm", "qsvd", "wsvd")


def check_report(rep: dict, preset: str) -> None:
    assert rep["model"] == "smollm2-135m" and rep["recipe"]["name"] == preset
    assert set(rep["test_shrink"]) == {"LLMPRESS_TEST_MODELS", "LLMPRESS_TEST_WINDOWS", "LLMPRESS_TEST_SEQLEN"}
    for side in ("baseline", "compressed"):
        ppl = rep[side]["ppl"]
        assert isinstance(ppl, float) and math.isfinite(ppl) and ppl > 1, (side, ppl)
    # a random tiny model predicts near-uniformly over its vocabulary: compressing it barely moves that
    assert 0.5 < rep["compressed"]["ppl"] / rep["baseline"]["ppl"] < 2, (rep["baseline"]["ppl"], rep["compressed"]["ppl"])
    b = weight_bits(preset)
    bpw = rep["bits_per_weight"]
    ratios = [st["ratio"] for st in rep["recipe"]["stages"] if st["method"] in LOWRANK]
    if ratios:  # low rank: the factors' 16-bit numbers, at most the ratio of the factored layers' (QSVD's shared B counts once)
        factored = [(lay["bits_per_weight"], lay["shape"][0] * lay["shape"][1]) for lay in rep["layers"].values() if lay.get("rank")]
        assert factored and 0 < sum(b * n for b, n in factored) <= 16 * min(ratios) * sum(n for _, n in factored), factored
        assert bpw < 16, bpw
    elif b is None:
        assert bpw == 16, bpw
    elif cb := [(lay["bits"], lay["bits_per_weight"]) for lay in rep["layers"].values() if lay.get("weights") is None and "bits" in lay]:
        # codebook layers: b-bit indices plus 2^b float16 entries per row (heavy on the tiny model's 64-wide rows) and kept weights
        assert all(w < x <= 16 for w, x in cb), cb
        assert b <= bpw <= 16, (b, bpw)
    else:  # each quantized linear within a bit of its width (scales, zero points, kept outliers); the whole
        # may sit higher: a rotation unties the head from the embedding and the float head counts as a linear
        # (each against its own grid's width: W4 blocks + int8 head, or a GGUF mixture of Q5_0 / Q8_0 / Q6_K)
        layer_bits = [(lay["weight_args"]["bits"], lay["bits_per_weight"]) for lay in rep["layers"].values() if lay.get("weight_args")]
        assert layer_bits and all(w <= x <= w + 1 for w, x in layer_bits), sorted(set(layer_bits))
        k_bits = {"Q4_K": 4.5, "Q5_K": 5.5}  # 144 / 176 bytes per 256 weights
        k_quant = [(lay["gguf_type"], lay["bits_per_weight"]) for lay in rep["layers"].values() if lay.get("gguf_type") in k_bits]
        assert all(x == k_bits[t] for t, x in k_quant), k_quant
        assert b <= bpw <= 16, (b, bpw)
    assert rep["baseline"]["bits_per_weight"] == 16
    for k in ("load", "baseline_eval", "compress_total", "compressed_eval", "save"):
        assert rep["seconds"][k] >= 0, k
    assert rep["peak_rss_mb"] > 100  # python + torch alone is ~250 MB
    assert rep["evaluation"]["windows"] == 4
    if rep["calibration"]:
        assert rep["calibration"]["windows"] == 4 and rep["calibration"]["seqlen"] == 32


def linear_outputs_agree(model, served, windows) -> list[str]:
    """Linears of ``served`` whose output on the in-memory model's own inputs differs (> LAYER_RTOL)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or isinstance(getattr(m, "linear", None), nn.Linear)]
    names = [n for n in names if n.rpartition(".")[0] not in names]  # a wrapper, not the linear inside it
    inputs, hooks = {}, []
    for n in names:
        hooks.append(get_module(model, n).register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, (a[0], o))))
    try:
        model(input_ids=windows)
    finally:
        for h in hooks:
            h.remove()
    bad = []
    for n, (x, want) in inputs.items():
        mine, theirs = get_module(model, n), get_module(served, n)
        # all rows (prefill: kernels dequantize once), then one token per window (<= 8 rows:
        # the CPU kernels' decode path)
        for x_, want_ in ((x, want), (x[:, -1:], mine(x[:, -1:]))):
            if (theirs(x_) - want_).abs().max().item() > LAYER_RTOL * want_.abs().max().item():
                bad.append(f"{n} ({type(theirs).__name__}, {x_.shape[0] * x_.shape[1]} rows)")
    return bad


@pytest.mark.parametrize("preset", list(presets()))
def test_preset_from_the_cli_saves_and_serves(preset, tmp_path, shrunk):
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    rc = cli.main(["compress", "smollm2-135m", "--recipe", preset, "--out", str(out), "--json", str(report_path)])
    assert rc == 0
    manifest = read_manifest(out)  # v2 exactly when the model carries a run-time part (rotations, KV / LLM.int8 quantizers)
    assert manifest["format"] == (FORMAT if runtime_state.summary(manifest) else FORMAT_V1)
    rep = json.loads(report_path.read_text())
    check_report(rep, preset)

    model, tok = llmpress.load("smollm2-135m")  # the tiny stand-in, through the same alias
    llmpress.compress(model, preset, tokenizer=tok)  # the CLI's defaults: CalibConfig(), seed 0
    windows = evaluation_windows(tok, model, EvalConfig())
    ppl = perplexity(model, windows, batch_size=EvalConfig().batch_size)
    assert abs(ppl - rep["compressed"]["ppl"]) <= PPL_RTOL * ppl, (ppl, rep["compressed"]["ppl"])
    with torch.no_grad():
        want = model(input_ids=windows).logits
        exact, _ = llmpress.load_compressed(str(out), backend="dequant")
        err = (exact(input_ids=windows).logits - want).abs().max().item()
        assert err <= LOGIT_RTOL * want.abs().max().item(), ("dequant backend", err, want.abs().max().item())
        served, _ = llmpress.load_compressed(str(out))  # what a user gets: the default backend
        assert not linear_outputs_agree(model, served, windows)
