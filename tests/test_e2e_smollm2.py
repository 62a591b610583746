"""End to end on the packaged SmolLM2-135M: perplexity against plain transformers, RTN ordering,
and a calibrated preset through the real `llmpress` command line.

Slow (about two minutes on 2 CPU cores): ``pytest -m slow``. The first load converts the
packaged GGUF (~40 s) into the llmpress cache; later runs reuse it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmpress
from llmpress import compress, stage
from llmpress.api import EvalConfig, evaluation_windows
from llmpress.calib.engine import EngineOptions
from llmpress.eval.perplexity import perplexity
from llmpress.quant import QuantArgs
from llmpress.shrink import VARIABLES as SHRINK_VARIABLES

pytestmark = pytest.mark.slow

N_WINDOWS = 8


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    model, tok = llmpress.load("smollm2-135m")
    windows = evaluation_windows(tok, model, EvalConfig(max_windows=N_WINDOWS))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp = perplexity(model, windows, batch_size=4)
    return model, tok, windows, state, fp


def test_perplexity_matches_plain_transformers(smollm2):
    model, tok, windows, _, fp = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert windows.shape == (N_WINDOWS, 512) and windows.dtype == torch.long
    # consecutive non-overlapping windows of the test split: no BOS for llama, no repeats
    assert not torch.equal(windows[0], windows[1])
    losses = []
    with torch.no_grad():
        for w in windows:
            ids = w.unsqueeze(0)
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    ref = math.exp(sum(losses) / len(losses))
    assert abs(fp - ref) / ref < 5e-4, (fp, ref)  # 3 significant digits
    assert 5 < fp < 60, fp  # a small instruct model on Wikipedia text


def _rtn_ppl(smollm2, args: QuantArgs) -> float:
    model, _, windows, state, _ = smollm2
    model.load_state_dict(state)
    try:
        rep = compress(model, [stage("rtn", weights=args)], engine=EngineOptions(progress=False))
        assert rep.compressed["quantized_linears"] == 30 * 7
        if args.granularity == "group":
            assert rep.bits_per_weight == args.bits + 16 / args.group_size
        else:  # one scale per row of 576 inputs (1536 for down_proj)
            assert args.bits + 16 / 1536 < rep.bits_per_weight < args.bits + 16 / 576
        return perplexity(model, windows, batch_size=4)
    finally:
        model.load_state_dict(state)


def test_rtn_bits_order_perplexity(smollm2):
    fp = smollm2[4]
    w8 = _rtn_ppl(smollm2, QuantArgs(bits=8, granularity="channel"))
    w4 = _rtn_ppl(smollm2, QuantArgs(bits=4, group_size=64))
    w3 = _rtn_ppl(smollm2, QuantArgs(bits=3, group_size=64))
    print(f"fp {fp:.3f}  w8 {w8:.3f}  w4g64 {w4:.3f}  w3g64 {w3:.3f}")
    assert abs(w8 - fp) / fp < 0.01, (fp, w8)
    # measured: fp 22.87, w8 22.95, w4g64 35.1, w3g64 242 (8 windows of 512)
    assert w4 > fp * 1.15 and w4 > w8 * 1.15, (fp, w8, w4)
    assert w3 > w4 * 1.5, (w4, w3)


def test_cli_gptq_end_to_end(tmp_path):
    """`llmpress compress smollm2-135m --recipe gptq-w4g64` as a user types it (progress on),
    small only through its own flags; then `llmpress eval` serves the saved checkpoint."""
    exe = str(Path(sys.executable).with_name("llmpress"))
    env = {k: v for k, v in os.environ.items() if k not in SHRINK_VARIABLES}  # the real model
    out, report = tmp_path / "g4", tmp_path / "g4.json"
    argv = [
        exe,
        "compress",
        "smollm2-135m",
        "--recipe",
        "gptq-w4g64",
        "--out",
        str(out),
        "--json",
        str(report),
        "--calib-samples",
        "8",
        "--eval-windows",
        "4",
    ]
    res = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["test_shrink"] is None and rep["recipe"]["name"] == "gptq-w4g64"
    assert rep["calibration"]["windows"] == 8 and rep["calibration"]["seqlen"] == 512
    assert rep["evaluation"]["windows"] == 4 and rep["bits_per_weight"] == 4.25
    base, comp = rep["baseline"]["ppl"], rep["compressed"]["ppl"]
    # measured (this command): 22.749 -> 34.420, 1.513x. With 8 calibration windows GPTQ is
    # barely better than RTN (1.53x); the README's 1.28x takes 128. A broken path gives 10x-1e4x.
    assert 5 < base < 60 and base < comp < 1.6 * base, (base, comp)
    served = subprocess.run([exe, "eval", str(out), "--eval-windows", "4"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert served.returncode == 0, served.stderr[-3000:]
    got = json.loads(served.stdout[served.stdout.index("{") :])
    assert abs(got["ppl"] - comp) / comp < 1e-3, (got["ppl"], comp)  # CPU int4 kernels vs the fake-quantized model
