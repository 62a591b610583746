"""Resume after a crash (llmpress.calib.resume): a run stopped after block k and resumed gives
the uninterrupted run's weights and records, bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import random_windows, tiny_llama

import llmpress
from llmpress import QuantArgs, stage
from llmpress.calib import engine as engine_mod
from llmpress.calib.engine import EngineOptions
from llmpress.calib.resume import BlockCheckpoints, record_from_state, record_state
from llmpress.errors import UserError
from llmpress.quant.core import QParams
from llmpress.registry import ModuleRecord

W4 = QuantArgs(bits=4, group_size=32)
A8 = QuantArgs(bits=8, granularity="token")
RECIPES = {
    "gptq-a8": [stage("gptq", weights=W4, activations=A8)],
    "awq+gptq": [stage("awq", weights=W4, quantize=False, search_windows=4, grid=4), stage("gptq", weights=W4)],
    "sparsegpt": [stage("sparsegpt", sparsity=0.5)],
    "quarot-gptq": "quarot-w4a4kv4-gptq",
    "gptq+head": [stage("gptq", weights=W4), stage("gptq", targets=["lm_head"], ignore=[], weights=QuantArgs(bits=8, granularity="channel"))],
    "omniquant-a8": [stage("omniquant", weights=W4, activations=A8, iters=10)],  # LET scales live in the norm / linear tensors
}


class Crash(Exception):
    pass


def _run(recipe, folder, resume=False, crash_after=None, layers=3):
    m = tiny_llama(seed=2, layers=layers)
    opts = EngineOptions(batch_size=2, progress=False, checkpoint_dir=str(folder), resume=resume)
    if crash_after is not None:
        save = BlockCheckpoints.save

        def crashing(self, i, *a, **kw):
            save(self, i, *a, **kw)
            if i == crash_after:
                raise Crash(i)

        BlockCheckpoints.save = crashing
    try:
        rep = llmpress.compress(m, recipe, data=random_windows(6, 24, seed=4), engine=opts)
    finally:
        if crash_after is not None:
            BlockCheckpoints.save = save
    return m, rep


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    # bit for bit (torch.equal would take -0.0 for 0.0)
    assert not [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(_bits(sa[k]), _bits(sb[k]))]
    assert [type(x).__name__ for x in a.modules()] == [type(x).__name__ for x in b.modules()]  # wrappers too


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("crash_after", [0, 2])
def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, name, crash_after):
    want, rep = _run(RECIPES[name], tmp_path / "plain")
    with pytest.raises(Crash):
        _run(RECIPES[name], tmp_path / "ck", crash_after=crash_after)
    assert (tmp_path / "ck" / f"block-{crash_after}.json").exists() and not (tmp_path / "ck" / f"block-{crash_after + 1}.json").exists()
    solved = []
    apply = engine_mod.RunState.apply_group

    def counting(self, items):
        solved.extend(n for n, _, _ in items)
        return apply(self, items)

    engine_mod.RunState.apply_group = counting
    try:
        got, rep2 = _run(RECIPES[name], tmp_path / "ck", resume=True)
    finally:
        engine_mod.RunState.apply_group = apply
    _same(got, want)
    assert not any(n.startswith(f"model.layers.{i}.") for i in range(crash_after + 1) for n in solved)  # finished blocks not redone
    assert set(rep2.result.records) == set(rep.result.records)
    for n, r in rep.result.records.items():
        r2 = rep2.result.records[n]
        assert (r2.methods, r2.weight_args, r2.act_args, r2.sparsity) == (r.methods, r.weight_args, r.act_args, r.sparsity), n
        if r.qparams is not None:
            assert torch.equal(r2.qparams.scale, r.qparams.scale), n


def test_checkpoints_keep_grid_weights_as_packed_codes(tmp_path):
    from safetensors import safe_open

    with pytest.raises(Crash):
        _run(RECIPES["gptq-a8"], tmp_path / "ck", crash_after=0)
    with safe_open(str(tmp_path / "ck" / "block-0.safetensors"), "pt") as f:
        keys = set(f.keys())
        codes = {k: f.get_tensor(k) for k in keys if k.startswith("codes.")}
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(codes) == sorted(f"codes.block.{n}.weight" for n in linears)
    assert not {f"block.{n}.weight" for n in linears} & keys  # no float copy beside the codes
    m = tiny_llama(seed=2, layers=3)
    for n in linears:  # 4 bits per weight: an eighth of float32
        w = m.get_submodule(f"model.layers.0.{n}").weight
        assert codes[f"codes.block.{n}.weight"].numel() * 32 == w.numel() * 4
    # the sign of -0.0 survives: a weight rounded to code 0 from below stays -0.0 after the resume
    want, _ = _run(RECIPES["gptq-a8"], tmp_path / "plain")
    got, _ = _run(RECIPES["gptq-a8"], tmp_path / "ck", resume=True)
    w = want.get_submodule("model.layers.0.mlp.down_proj").weight
    negzero = (w == 0) & torch.signbit(w)
    assert negzero.any()
    assert torch.equal(torch.signbit(got.get_submodule("model.layers.0.mlp.down_proj").weight), torch.signbit(w))


def test_a_weight_off_its_grid_stays_float(tmp_path):
    from llmpress.calib.resume import _grid_codes

    w = torch.randn(4, 64)
    args = QuantArgs(bits=4, group_size=32)
    from llmpress.quant.core import compute_qparams, fake_quantize

    qp = compute_qparams(w, args)
    rec = ModuleRecord(name="x", out_features=4, in_features=64, weight_args=args, qparams=qp)
    assert _grid_codes(w, rec) is None  # not on the grid: kept as float
    q = fake_quantize(w, args, qp)
    parts = _grid_codes(q, rec)
    assert parts is not None and parts["codes"].dtype == torch.int32
    q2 = q.clone()
    q2[0, 0] += 1e-3  # one weight off the grid
    assert _grid_codes(q2, rec) is None


def test_another_run_is_refused_and_a_fresh_run_starts_over(tmp_path):
    with pytest.raises(Crash):
        _run(RECIPES["gptq-a8"], tmp_path / "ck", crash_after=0)
    with pytest.raises(UserError, match="belongs to another run"):
        _run(RECIPES["sparsegpt"], tmp_path / "ck", resume=True)
    m, _ = _run(RECIPES["sparsegpt"], tmp_path / "ck")  # without --resume: the folder starts over
    assert sorted(p.name for p in (tmp_path / "ck").iterdir())[:2] == ["block-0.json", "block-0.safetensors"]


def test_structure_changing_stages_are_refused_before_work():
    with pytest.raises(UserError, match=r"stage 0 \(llm_int8\)"):
        engine_mod.check_resumable(llmpress.api._as_recipe("llm-int8"))


def test_record_state_round_trip():
    rec = ModuleRecord(name="l", out_features=4, in_features=8, methods=["gptq"], weight_args=W4, act_args=A8, sparsity=0.25,
                       qparams=QParams(scale=torch.rand(4, 1), zero_point=None), notes={"damp": 0.3, "g_idx": torch.arange(8), "awq": {"alpha": 0.5}},
                       form="quant", payload={"a": torch.ones(4, 2)})  # fmt: skip
    meta, t = record_state(rec)
    back = record_from_state(meta, t)
    assert back.name == "l" and back.weight_args == W4 and back.act_args == A8 and back.sparsity == 0.25 and back.form == "quant"
    assert torch.equal(back.qparams.scale, rec.qparams.scale) and back.qparams.zero_point is None
    assert (
        torch.equal(back.notes["g_idx"], rec.notes["g_idx"])
        and back.notes["awq"] == {"alpha": 0.5}
        and torch.equal(back.payload["a"], torch.ones(4, 2))
    )


KILL = """
import os, signal, sys
from llmpress.calib import resume
from llmpress.cli import main
save = resume.BlockCheckpoints.save
def killing(self, i, *a, **kw):
    save(self, i, *a, **kw)
    if i == {block}:
        os.kill(os.getpid(), signal.SIGKILL)
resume.BlockCheckpoints.save = killing
sys.exit(main(sys.argv[1:]))
"""


def test_sigkilled_command_resumes_to_the_same_checkpoint(tmp_path, tiny_alias_folders):
    """The command users run, killed (SIGKILL) after block 0, then run again with --resume:
    the same weights file, byte for byte, as an uninterrupted run; nothing left beside it."""
    import json
    import os
    import subprocess
    import sys

    from conftest import shrink_env

    env = {**os.environ, **shrink_env(tiny_alias_folders, windows=6), "OMP_NUM_THREADS": "1"}
    argv = ["compress", "smollm2-135m", "--recipe", "gptq-w4g64", "--batch-size", "2", "--eval-data", "wiki"]
    plain = subprocess.run([sys.executable, "-m", "llmpress", *argv, "--out", str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-2000:]
    out = tmp_path / "b"
    killed = subprocess.run([sys.executable, "-c", KILL.format(block=0), *argv, "--out", str(out)], env=env, capture_output=True, text=True)
    assert killed.returncode == -9 and not out.exists()
    assert (tmp_path / ".b.resume" / "block-0.json").exists()
    again = subprocess.run([sys.executable, "-m", "llmpress", *argv, "--out", str(out), "--resume"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed after block 0" in again.stderr
    assert (out / "model.llmpress.safetensors").read_bytes() == (tmp_path / "a" / "model.llmpress.safetensors").read_bytes()
    ra, rb = (json.loads((p / "llmpress.json").read_text())["report"] for p in (tmp_path / "a", out))
    assert rb["compressed"]["ppl"] == ra["compressed"]["ppl"] and rb["layers"] == ra["layers"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # the block checkpoints and the stale lock are gone
