"""benchmarks/token_weights.py (issue 19): tr(H_a)/tr(H) per block linear of the tiny gemma
stand-in, through the functions plan-bits runs, against the same ratio computed here from
the linears' captured inputs and their output gradients (autograd)."""

import json

import pytest
import torch
from bench_scripts import load_script
from conftest import shrink_env

tw = load_script("token_weights")


def test_ratios_match_the_token_weighted_trace(tiny_alias_folders, tmp_path, monkeypatch, capsys):
    from llmpress import api, models
    from llmpress.runtime.head import loss_parts, next_token_loss

    for k, v in shrink_env(tiny_alias_folders).items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "tw.json"
    monkeypatch.setattr("sys.argv", ["token_weights.py", "--model", "gemma3-270m", "--windows", "2", "--out", str(out)])
    tw.main()
    r = json.loads(out.read_text())["ratio"]
    table = capsys.readouterr().out
    assert len(r) == 14 and all(f"| {k} |" in table for k in ("q_proj", "o_proj", "down_proj"))
    model, tok = models.load("gemma3-270m")
    data = api.calibration_windows(tok, model, api.CalibConfig(n_samples=2, seqlen=512, seed=0))
    name = "model.layers.1.mlp.down_proj"
    got = {}
    mod = dict(model.named_modules())[name]

    def keep(_m, i, o):
        got["x"] = i[0].detach()
        o.retain_grad()
        got["y"] = o

    for p in model.parameters():
        p.requires_grad_(False)
    parts = loss_parts(model, data[:1, :4])
    h = mod.register_forward_hook(keep)
    xs, gs = [], []
    for b in data.split(1):
        emb = model.get_input_embeddings()(b).detach().requires_grad_(True)
        next_token_loss(model, parts, b, emb).backward()
        xs.append(got["x"].pow(2).sum(-1).reshape(-1))
        gs.append(got["y"].grad.pow(2).sum(-1).reshape(-1))
    h.remove()
    x, g = torch.cat(xs).double(), torch.cat(gs).double()
    want = float((g / g.mean() * x).sum() / x.sum())
    assert r[name] == pytest.approx(want, rel=1e-3)
