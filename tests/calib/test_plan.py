"""The plan (built and checked once per compress) and the compress result (an explicit object,
not attributes on the model)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_windows, tiny_llama, tiny_tokenizer
from helpers import QUIET, logits

import llmpress
from llmpress import QuantArgs, api, stage
from llmpress.calib import plan as plan_mod
from llmpress.calib.plan import build_plan
from llmpress.errors import UserError
from llmpress.recipe import Recipe
from llmpress.runtime.act_quant import ActQuantLinear, plain_state_dict

W4 = QuantArgs(bits=4, group_size=32)
A8 = QuantArgs(bits=8, granularity="token")


def _recipe(*stages) -> Recipe:
    return Recipe(stages=tuple(stages))


def test_plan_maps_stages_needs_and_scopes():
    m = tiny_llama()
    r = _recipe(
        stage("owl", lam=0.1),
        stage("awq", weights=W4, quantize=False),
        stage("gptq", weights=W4),
        stage("rtn", weights=W4, targets=["re:.*down_proj"]),
    )
    p = build_plan(m, r)
    linears = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    assert list(p.targets) == linears  # model order; the head is ignored by default
    down = "model.layers.1.mlp.down_proj"
    assert [(i, s.method) for i, s in p.targets[down]] == [(2, "gptq"), (3, "rtn")]
    assert [(i, s.method) for i, s in p.targets["model.layers.0.self_attn.q_proj"]] == [(2, "gptq")]
    assert p.needs[down] == {"hessian"}
    assert [i for i, _ in p.model_stages] == [0] and [i for i, _ in p.block_stages] == [1]
    assert p.needs_data and p.engine_needs_data
    assert p.local_targets("model.layers.0")["mlp.down_proj"] == "model.layers.0.mlp.down_proj"
    assert p.description() == "compress (awq, gptq, rtn)"
    free = build_plan(m, _recipe(stage("rtn", weights=W4)))
    assert not free.needs_data and not free.engine_needs_data and free.description() == "compress (rtn)"


@pytest.mark.parametrize(
    "stages, msg",
    [
        ([stage("rtn", weights=QuantArgs(bits=4, group_size=48))], "group_size 48 does not divide the input dimension 64"),
        ([stage("rtn", weights=W4, targets=["re:.*nothing"])], "stage 0 .*matches no linear"),
        ([stage("gptq", weights=W4, targets=["lm_head"], ignore=[]), stage("gptq", weights=W4, targets=["re:model.embed.*"])], "matches no linear"),
    ],
)
def test_plan_refuses_before_any_weight_changes(stages, msg):
    m = tiny_llama()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(UserError, match=msg):
        llmpress.compress(m, stages, data=random_windows(2, 16), engine=QUIET)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_one_plan_per_compress_and_per_pipeline(monkeypatch, tiny_model_dir):
    calls = []
    real = plan_mod.build_plan

    def counting(model, recipe):
        calls.append(recipe)
        return real(model, recipe)

    monkeypatch.setattr(api, "build_plan", counting)
    llmpress.compress(tiny_llama(), [stage("gptq", weights=W4)], data=random_windows(2, 16), engine=QUIET)
    assert len(calls) == 1
    calls.clear()
    api.run_pipeline(str(tiny_model_dir), "gptq-w4g64", evaluation=None, engine=QUIET)
    assert len(calls) == 1


def test_result_travels_in_the_report_not_on_the_model():
    m = tiny_llama()
    names = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
    rep = llmpress.compress(m, [stage("wanda", sparsity=0.5), stage("rtn", weights=W4, activations=A8)], data=random_windows(2, 16), engine=QUIET)
    assert set(rep.result.records) == names and set(rep.result.act_quant) == names
    assert all(r.methods == ["wanda", "rtn"] and abs(r.sparsity - 0.5) < 0.02 for r in rep.result.records.values())
    assert not [k for mod in m.modules() for k in vars(mod) if k.startswith("llmpress")]
    d = rep.to_dict()
    assert "result" not in d and set(d["layers"]) == names  # the JSON keeps the per-layer summary only


def test_save_reads_the_model_without_changing_it(tmp_path):
    m = tiny_llama()
    rep = llmpress.compress(m, [stage("rtn", weights=W4, activations=A8)], engine=QUIET)
    ids = random_windows(2, 16)
    mods, want = dict(m.named_modules()), logits(m, ids)
    for fmt in ("packed", "hf-fakequant"):
        out = api.save(m, tiny_tokenizer(), tmp_path / fmt, report=rep, format=fmt)
        assert dict(m.named_modules()) == mods  # same module objects: no wrapper taken off and put back
        loaded, _ = llmpress.load_compressed(str(out), backend="dequant")
        assert torch.equal(logits(loaded, ids), want), fmt
    state = plain_state_dict(m)
    assert "model.layers.0.self_attn.q_proj.weight" in state and not any(".linear." in k for k in state)
    assert set(state) == set(tiny_llama().state_dict())


def test_save_without_the_report_refuses_a_compressed_model(tmp_path):
    m = tiny_llama()
    llmpress.compress(m, [stage("rtn", weights=W4, activations=A8)], engine=QUIET)
    assert any(isinstance(mod, ActQuantLinear) for mod in m.modules())
    with pytest.raises(UserError, match="pass report="):
        api.save(m, None, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []
    plain = api.save(tiny_llama(), None, tmp_path / "dense")  # an untouched model: dense, no report needed
    assert llmpress.load_compressed(str(plain))[0] is not None
