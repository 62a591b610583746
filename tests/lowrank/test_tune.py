"""lowrank_tune: a block's factors trained together against the full-precision block output."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_windows, tiny_llama
from helpers import QUIET, logits

from llmpress import api, compress, load_compressed, stage
from llmpress.errors import LlmpressError
from llmpress.quant.args import QuantArgs

ALL = {"targets": ["Linear"], "ignore": ["lm_head"]}
QKV = ["re:.*self_attn\\.(q|k|v)_proj$"]


def _logit_error(model, ref, ids) -> float:
    return float((logits(model, ids) - ref).pow(2).mean())


def test_tuned_factors_lower_every_block_error_and_the_model_error(tmp_path):
    """svd_llm at half the parameters, then lowrank_tune: each block's error over the calibration
    windows goes down, the model's logits get closer to the original's on held-out windows, the
    ranks (and so the bytes) stay, and the saved checkpoint serves the tuned factors."""
    fp = tiny_llama()
    ids, held = random_windows(64, 64), random_windows(4, 64, seed=9)  # enough tokens that the factors do not just fit the windows
    ref = logits(fp, held)
    plain, tuned = copy.deepcopy(fp), copy.deepcopy(fp)
    rep0 = compress(plain, [stage("svd_llm", ratio=0.5, **ALL)], data=ids, engine=QUIET)
    rep = compress(tuned, [stage("svd_llm", ratio=0.5, **ALL), stage("lowrank_tune", iters=60, **ALL)], data=ids, engine=QUIET)
    notes = [r["lowrank_tune"] for r in rep.layers.values() if "lowrank_tune" in r]
    assert len(notes) == 14  # 7 linears x 2 blocks
    assert all(n["block_mse_after"] < n["block_mse_before"] and not n["kept_start"] for n in notes)
    assert _logit_error(tuned, ref, held) < 0.97 * _logit_error(plain, ref, held)  # measured 0.93x
    assert {k: r["rank"] for k, r in rep.layers.items()} == {k: r["rank"] for k, r in rep0.layers.items()}
    assert rep.bits_per_weight == rep0.bits_per_weight
    api.save(tuned, None, tmp_path / "c", report=rep)
    back, _ = load_compressed(str(tmp_path / "c"))
    assert torch.allclose(logits(back, held), logits(tuned, held), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("w4", [False, True])
def test_qsvd_tuned_keeps_one_shared_latent(tmp_path, w4):
    """QSVD's B is one parameter: after tuning q/k/v still share one tensor (stored once, with
    one set of scales when on a grid) and the checkpoint decodes with the latent cache."""
    model = tiny_llama()
    grid = {"weights": QuantArgs(bits=4, granularity="group", group_size=16)} if w4 else {}
    sts = [stage("qsvd", targets=QKV, ratio=0.6, **grid), stage("lowrank_tune", targets=QKV, iters=20)]
    rep = compress(model, sts, data=random_windows(8, 32), engine=QUIET)
    for i in range(2):
        recs = [rep.result.records[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"]
        assert recs[0].payload["B"] is recs[1].payload["B"] is recs[2].payload["B"]
        if w4:
            assert recs[0].payload["B.scale"] is recs[1].payload["B.scale"] is recs[2].payload["B.scale"]
        assert "lowrank_tune" in recs[0].methods and not recs[0].notes["lowrank_tune"]["kept_start"]
    api.save(model, None, tmp_path / "c", report=rep)
    back, _ = load_compressed(str(tmp_path / "c"))
    assert back.llmpress_latent_kv == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    ids = random_windows(2, 16, seed=3)
    assert torch.allclose(logits(back, ids), logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "stages,match",
    [
        ([stage("lowrank_tune", **ALL)], r"lowrank_tune\) needs a low-rank stage before it"),
        (
            [stage("svd_llm", targets=QKV, ratio=0.5), stage("lowrank_tune", **ALL)],
            r"o_proj: recipe stage 1 \(lowrank_tune\) needs a low-rank stage before it",
        ),
    ],
)
def test_tune_without_factors_is_refused_before_anything_changes(stages, match):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LlmpressError, match=match):
        compress(model, stages, data=random_windows(4, 16), engine=QUIET)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("bad,match", [({"mode": "sequential"}, "sequential's targets"), ({"lr": 0}, "lr=0"), ({"iters": 0}, "iters=0")])
def test_bad_tune_settings_are_refused(bad, match):
    with pytest.raises(LlmpressError, match=match):
        stage("lowrank_tune", **ALL, **bad)


@pytest.mark.parametrize("solver", ["rtn", "gptq"])
def test_quantized_factors_are_tuned_through_their_grid(tmp_path, solver):
    """W4 factors (RTN or GPTQ) tuned through their grid: every block's error goes down (or the
    stored factors stay), the factors end on the grid with the same bits, and the checkpoint
    serves them."""
    from llmpress.quant.core import fake_quantize

    w4 = QuantArgs(bits=4, granularity="group", group_size=16)
    fp = tiny_llama()
    ids, held = random_windows(32, 64), random_windows(4, 64, seed=9)
    ref = logits(fp, held)
    plain, tuned = copy.deepcopy(fp), copy.deepcopy(fp)
    factor = stage("svd_llm", rank=16, weights=w4, solver=solver, **ALL)
    rep0 = compress(plain, [factor], data=ids, engine=QUIET)
    rep = compress(tuned, [factor, stage("lowrank_tune", iters=40, **ALL)], data=ids, engine=QUIET)
    notes = [r["lowrank_tune"] for r in rep.layers.values() if "lowrank_tune" in r]
    assert len(notes) == 14 and sum(not n["kept_start"] for n in notes) >= 7
    assert all(n["block_mse_after"] <= n["block_mse_before"] for n in notes)
    assert rep.bits_per_weight == rep0.bits_per_weight
    for name, r in rep.result.records.items():
        for f in ("A", "B"):
            assert torch.equal(r.payload[f], fake_quantize(r.payload[f], w4)), f"{name}.{f} off its grid"
    if solver == "rtn":  # GPTQ's factors start nearer; on this random model the held-out logits come out level (1.01x)
        assert _logit_error(tuned, ref, held) < _logit_error(plain, ref, held)
    api.save(tuned, None, tmp_path / "c", report=rep)
    back, _ = load_compressed(str(tmp_path / "c"), backend="dequant")
    assert torch.allclose(logits(back, held), logits(tuned, held), atol=1e-4, rtol=1e-4)
