"""KL divergence and top-1 agreement against the full-precision model (issue 21 part 4,
llmpress/eval/kl.py): exact on hand-made distributions, zero for a model against itself, the
same figure through the plain, chunked and streamed evaluations and `eval --baseline`, per
source in the JSON report and in the printed table."""

from __future__ import annotations

import copy
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import random_windows, save_tiny_model, tiny_llama, tiny_tokenizer
from helpers import QUIET, cli_fails, run_cli

from llmpress import api
from llmpress.errors import UserError
from llmpress.eval.kl import BaselineLogprobs, kl_stats, token_kl
from llmpress.eval.perplexity import perplexity

pytestmark = pytest.mark.usefixtures("restore_logging")
perplexity_mod = importlib.import_module("llmpress.eval.perplexity")  # the module (llmpress.eval.perplexity is also the function)

EVAL = api.EvalConfig(source="wiki,news", max_windows=4, seqlen=32, batch_size=2, kl_windows=3)


def test_token_kl_against_a_hand_computation():
    base = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]).log()  # a zero-probability token: no NaN
    logits = torch.zeros(2, 4) + 7.0  # uniform, whatever the offset
    kl = token_kl(base, logits)
    assert kl[0].item() == pytest.approx(0.5 * math.log(2), abs=1e-6)  # 0.5 ln(0.5/0.25) + 2 x 0.25 ln 1
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    s = kl_stats(torch.arange(101, dtype=torch.float64) / 100, torch.tensor([True] * 75 + [False] * 26))
    assert s == {"kl": pytest.approx(0.5), "kl_p99": pytest.approx(0.99), "top1": pytest.approx(75 / 101), "tokens": 101}


@pytest.mark.parametrize("chunked", [True, False])
def test_a_model_against_itself_is_zero_and_agrees_everywhere(chunked):
    model, windows = tiny_llama(), random_windows(6, 32)
    rec = BaselineLogprobs(4)
    folder = Path(rec._tmp.name)
    ppl = perplexity(model, windows, 4, kl=rec.recorder("a"))
    assert [p.stat().st_size for p in folder.iterdir()] == [4 * 31 * 256 * 2]  # float16 rows of the first 4 windows
    again = perplexity(model, windows, 3, chunked=chunked, kl=rec.comparer("a"))
    assert again == pytest.approx(ppl, rel=1e-5)
    s = rec.stats["a"]
    assert s["tokens"] == 4 * 31 and s["top1"] == 1.0
    assert abs(s["kl"]) < 2e-6 and abs(s["kl_p99"]) < 5e-6  # the float16 rounding of near-uniform log-probabilities
    assert list(folder.iterdir()) == []  # compared: the file is gone
    rec.close()
    assert not folder.exists()


def test_kl_and_top1_equal_a_direct_computation_and_cover_all_windows_when_fewer():
    base, windows = tiny_llama(), random_windows(5, 32)
    other = copy.deepcopy(base)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    rec = BaselineLogprobs(16)  # more than there are windows: all of them
    perplexity(base, windows, 2, kl=rec.recorder("a"))
    perplexity(other, windows, 2, kl=rec.comparer("a"))
    with torch.no_grad():
        lp = torch.log_softmax(base(windows).logits[:, :-1].double(), -1)
        lq = torch.log_softmax(other(windows).logits[:, :-1].double(), -1)
    direct = (lp.exp() * (lp - lq)).sum(-1).flatten()
    top1 = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
    s = rec.stats["a"]
    assert s["tokens"] == 5 * 31
    assert s["kl"] == pytest.approx(direct.mean().item(), rel=1e-4) and s["kl"] > 0.01
    assert s["kl_p99"] == pytest.approx(torch.quantile(direct, 0.99).item(), rel=1e-3)
    assert s["top1"] == pytest.approx(top1) and s["top1"] < 1.0


def test_other_windows_or_another_vocabulary_are_refused():
    windows = random_windows(4, 16)
    rec = BaselineLogprobs(2)
    perplexity(tiny_llama(), windows, 2, kl=rec.recorder("a"))
    with pytest.raises(UserError, match="differ from the baseline"):
        perplexity(tiny_llama(), random_windows(4, 16, seed=5), 2, kl=rec.comparer("a"))
    with pytest.raises(UserError, match="vocabulary has 300 entries, the baseline's 256"):
        perplexity(tiny_llama(vocab=300), windows, 2, kl=rec.comparer("a"))
    with pytest.raises(UserError, match="no baseline"):
        rec.comparer("b")
    with pytest.raises(UserError, match="--kl-windows"):
        api.EvalConfig(kl_windows=-1)


def _keys(figures: dict) -> dict:
    return {k: figures[k] for k in ("kl_by_source", "kl_p99_by_source", "top1_by_source")}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_quantized_model_same_kl_through_every_path(tmp_path, monkeypatch, family):
    model = save_tiny_model(tmp_path / "m", family)
    kw = dict(calib=api.CalibConfig(n_samples=4, seqlen=32, batch_size=4), evaluation=EVAL, engine=QUIET)
    mem = api.run_pipeline(str(model), "rtn-w4g64", out=str(tmp_path / "q"), json_path=str(tmp_path / "r.json"), **kw)
    streamed = api.run_pipeline(str(model), "rtn-w4g64", stream=True, **kw)
    c = mem.compressed
    assert list(c["kl_by_source"]) == ["wiki", "news"]
    assert all(v > 1e-4 for v in c["kl_by_source"].values()) and all(0 < v <= 1 for v in c["top1_by_source"].values())
    assert (c["kl"], c["kl_p99"], c["top1"]) == (c["kl_by_source"]["wiki"], c["kl_p99_by_source"]["wiki"], c["top1_by_source"]["wiki"])
    assert mem.evaluation["kl_tokens_by_source"] == {"wiki": 3 * 31, "news": 3 * 31} and mem.evaluation["kl_windows"] == 3
    report = json.loads((tmp_path / "r.json").read_text())
    assert _keys(report["compressed"]) == _keys(c)
    for s, v in _keys(streamed.compressed)["kl_by_source"].items():
        assert v == pytest.approx(c["kl_by_source"][s], rel=1e-6)
    assert _keys(streamed.compressed)["top1_by_source"] == c["top1_by_source"]
    # the saved checkpoint against the original model: `eval --baseline`, chunked and plain
    ev = api.evaluate(str(tmp_path / "q"), EVAL, progress=False, baseline=str(model))
    assert ev.baseline["ppl_by_source"] == pytest.approx(mem.baseline["ppl_by_source"])
    monkeypatch.setattr(perplexity_mod, "split_head", lambda m: None)  # every model the plain way
    plain = api.evaluate(str(tmp_path / "q"), EVAL, progress=False, baseline=str(model))
    for other in (ev, plain):
        assert other.compressed["top1_by_source"] == c["top1_by_source"]
        for s, v in other.compressed["kl_by_source"].items():
            assert v == pytest.approx(c["kl_by_source"][s], rel=1e-4)
            assert other.compressed["kl_p99_by_source"][s] == pytest.approx(c["kl_p99_by_source"][s], rel=1e-3)


def test_cli_compress_prints_them_and_kl_windows_0_turns_them_off(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    base = ["compress", str(model), "--recipe", "rtn-w4g64", "--seqlen", "32", "--eval-windows", "3", "--no-progress"]
    assert run_cli([*base, "--eval-data", "wiki,news", "--kl-windows", "2", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "r.json").read_text())["compressed"]
    for s in ("wiki", "news"):
        row = next(ln for ln in out.splitlines() if ln.startswith(f"KL divergence, mean / p99 ({s})"))
        assert row.split()[-3:] == [f"{rep['kl_by_source'][s]:.4g}", "/", f"{rep['kl_p99_by_source'][s]:.4g}"]
        row = next(ln for ln in out.splitlines() if ln.startswith(f"top-1 agreement ({s})"))
        assert row.split()[-1] == f"{100 * rep['top1_by_source'][s]:.2f}%"
    assert run_cli([*base, "--kl-windows", "0", "--json", str(tmp_path / "off.json")]) == 0
    assert "KL divergence" not in capsys.readouterr().out
    assert "kl" not in json.loads((tmp_path / "off.json").read_text())["compressed"]


def test_cli_eval_baseline(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    out = tmp_path / "q"
    assert run_cli(["compress", str(model), "--recipe", "rtn-w4g64", "--out", str(out), "--no-progress", "--no-eval"]) == 0
    capsys.readouterr()
    argv = ["eval", str(out), "--seqlen", "32", "--eval-windows", "2", "--no-progress"]
    assert run_cli([*argv, "--baseline", str(model)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kl"] > 0 and printed["kl_by_source"] == {"wiki": printed["kl"]} and 0 < printed["top1"] <= 1
    assert list(printed["baseline_ppl_by_source"]) == ["wiki"]
    assert run_cli(argv) == 0
    assert "kl" not in json.loads(capsys.readouterr().out)  # no baseline, no divergence
    cli_fails(capsys, [*argv, "--baseline", str(model), "--stream"], "--baseline", "not with --stream")


def test_cli_kl_refusals(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    other = tmp_path / "wide"  # the same tokenizer, a model with a wider vocabulary
    tiny_llama(vocab=300).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    argv = ["eval", str(model), "--seqlen", "32", "--eval-windows", "2", "--no-progress", "--json", str(tmp_path / "r.json")]
    cli_fails(capsys, [*argv, "--kl-windows", "-1"], "argument --kl-windows: must be at least 0, got -1")
    cli_fails(capsys, [*argv, "--baseline", str(model), "--stream"], "--baseline evaluates both models in memory", "not with --stream")
    cli_fails(capsys, [*argv, "--baseline", str(model), "--kv", "full"], "--kv evaluates a model in memory on its own; not with --baseline")
    cli_fails(capsys, [*argv, "--baseline", str(other)], "the model's vocabulary has", "entries, the baseline's 300: no KL divergence")
    assert not (tmp_path / "r.json").exists()
