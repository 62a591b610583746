"""The analysis pipeline on tiny random models: hooks, planted outliers, interventions, report, CLI."""

import json
import re
import shutil
import subprocess

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama, tiny_tokenizer

from llmpress.analysis import AnalysisConfig, analyze
from llmpress.analysis.collect import SITES, backbone, capture, collect, norm_scale
from llmpress.analysis.interventions import features_zeroed, massive_layers, massive_replaced
from llmpress.analysis.report import console_summary, rerender, write_outputs
from llmpress.analysis.superweight import find_super_weights, weights_zeroed
from llmpress.arch import get_arch


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_collect_every_site_and_the_norm_decomposition(make):
    m = make()
    w = random_windows(3, 24)
    col = collect(m, w, batch_size=2)
    assert set(col.stats) == set(SITES)
    for site, st in col.stats.items():
        assert sorted(st) == [0, 1], site
        assert st[0].n == 3 * 24 and st[0].n_seqs == 3
    # standardized: mean of x^2 over channels is 1 for every token
    s = col.site("attn_norm_std")[1]
    assert float(s.ch_s2.sum()) / (s.n * s.channels) == pytest.approx(1.0, rel=1e-2)  # eps shifts it slightly
    # the norm output is gamma * standardized, channel by channel
    spec = get_arch(m)
    for role, out_site in (("attn", "qkv_in"), ("mlp", "gate_up_in")):
        g = col.norm_gamma[role][0]
        std_mean = col.site(f"{role}_norm_std")[0].channel_mean()
        assert torch.allclose(col.site(out_site)[0].channel_mean(), g * std_mean, atol=1e-4)
    if spec.norm_kind == "rms_1p":  # gemma's scale is 1 + w
        norm = m.model.layers[0].input_layernorm
        assert torch.allclose(norm_scale(norm, "rms_1p"), 1 + norm.weight)
    # the residual after block 0 is what enters block 1
    assert torch.allclose(col.site("resid")[0].ch_absmax, col.site("attn_norm_in")[1].ch_absmax)


def _plant_massive(model, layer=0, channel=5, value=1000.0):
    def hook(mod, inp, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, 0, channel] += value
        return (h, *out[1:]) if isinstance(out, tuple) else h

    return model.model.layers[layer].register_forward_hook(hook)


def test_planted_massive_activation_found_and_replaced():
    m = tiny_llama()
    handle = _plant_massive(m, 0, 5, 1000.0)
    try:
        w = random_windows(4, 32)
        col = collect(m, w)
        from llmpress.analysis.pipeline import massive_findings

        mf = massive_findings(col)
        assert mf["top"]["pos"] == 0 and mf["top"]["channel"] == 5 and mf["top"]["value"] == pytest.approx(1000, rel=0.05)
        assert mf["first_layer_eta_rule"] == 0 and massive_layers(col) == [0, 1]
        assert (mf["pairs"][0]["pos"], mf["pairs"][0]["channel"]) == (0, 5)
        for mode, expect in (("zero", 0.0), ("mean", None)):
            with massive_replaced(m, col, mode, [0]) as cnt:
                cap = capture(m, w[:1], [0], ("resid",))
            v = float(cap["resid"][0][0, 5])
            assert cnt["changed"] == 1
            if expect is not None:
                assert v == expect
            else:
                assert v == pytest.approx(col.site("resid")[0].channel_massive_mean()[5])
        after = capture(m, w[:1], [0], ("resid",))
        assert float(after["resid"][0][0, 5]) > 900  # hooks removed
    finally:
        handle.remove()


def test_features_zeroed_hits_every_projection_input():
    m = tiny_llama()
    w = random_windows(1, 16)
    with features_zeroed(m, [3, 7]):
        cap = capture(m, w, [0, 1], ("qkv_in", "resid"))
    assert cap["qkv_in"][1][:, [3, 7]].abs().max() == 0
    assert cap["qkv_in"][1][:, 4].abs().max() > 0


def _plant_super_weight(m, layer=1, row=9, col=21):
    """An input spike at down_proj column ``col`` (large gate/up rows) times a large W[row, col]."""
    mlp = m.model.layers[layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[col] = 0.5
        mlp.up_proj.weight[col] = 0.5
        mlp.down_proj.weight[row, col] = 30.0


def test_super_weight_found_and_weights_restored():
    m = tiny_llama()
    _plant_super_weight(m, 1, 9, 21)
    before = m.model.layers[1].mlp.down_proj.weight.clone()
    ids = random_windows(1, 12)
    res = find_super_weights(m, ids)
    sws = res["super_weights"]
    assert sws and (sws[0]["layer"], sws[0]["row"], sws[0]["col"]) == (1, 9, 21)
    assert sws[0]["weight"] == 30.0
    assert res["iterations"][-1].get("stop")
    assert torch.equal(m.model.layers[1].mlp.down_proj.weight, before)  # restored
    with weights_zeroed(m, sws[:1]):
        assert m.model.layers[1].mlp.down_proj.weight[9, 21] == 0
    assert m.model.layers[1].mlp.down_proj.weight[9, 21] == 30.0


def test_no_super_weight_in_a_random_model():
    res = find_super_weights(tiny_gemma3(), random_windows(1, 12))
    assert res["super_weights"] == [] and res["iterations"][0]["stop"] == "no down_proj output spike"


def test_backbone_skips_the_head():
    m = tiny_llama()
    assert backbone(m) is m.model


def _check_outputs(out, an):
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", html)  # nothing from the network
    assert "<script" not in html
    data = json.loads((out / "analysis.json").read_text())
    for key in ("massive", "channel_outliers", "int8_features", "super_weights", "difficulty", "per_channel_absmax", "thresholds"):
        assert key in data
    assert len(list((out / "img").glob("*.png"))) == len(an.images) >= 8
    return html, data


def test_analyze_llama_end_to_end(tmp_path):
    tok = tiny_tokenizer()
    m = tiny_llama(vocab=len(tok))
    _plant_super_weight(m, 1, 9, 21)
    handle = _plant_massive(m, 0, 5, 1000.0)
    try:
        w = random_windows(2, 16, len(tok))
        cfg = AnalysisConfig(windows=2, seqlen=16, progress=False, tokens_3d=8, random_seeds=1, features_k=2, layers_3d=(1,))
        an = analyze(m, tok, cfg, windows=w)
    finally:
        handle.remove()
    s = an.summary
    assert (0, 5) in [(p["pos"], p["channel"]) for p in s["massive"]["pairs"]]
    assert [(x["layer"], x["row"], x["col"]) for x in s["super_weights"]["super_weights"]][:1] == [(1, 9, 21)]
    names = [r["name"] for r in s["interventions"]["rows"]]
    assert names[0] == "none" and "super weights -> 0" in names
    assert any(n.startswith("massive->zero") for n in names) and any(n.startswith("massive->mean") for n in names)
    assert any(n.startswith("top-2 outlier dims") for n in names) and any(n.startswith("random-2") for n in names)
    for r in s["interventions"]["rows"]:
        assert r["ppl"] > 1 and 0 <= r["top1_prob"] <= 1
    write_outputs(an, tmp_path / "rep")
    html, _ = _check_outputs(tmp_path / "rep", an)
    assert "Super weights" in html and "model.layers.1.mlp.down_proj" in html
    again = rerender(tmp_path / "rep").read_text()  # from analysis.json + img/, no model
    assert again.count("data:image/png;base64,") == html.count("data:image/png;base64,")
    assert re.search(r"<h2>Findings</h2>.*?</ul>", again, re.S).group(0) == re.search(r"<h2>Findings</h2>.*?</ul>", html, re.S).group(0)
    text = console_summary(an)
    assert "model.layers.1.mlp.down_proj[9, 21]" in text and "super weights -> 0" in text


def test_analyze_gemma_without_interventions(tmp_path):
    tok = tiny_tokenizer()
    m = tiny_gemma3(vocab=len(tok))
    cfg = AnalysisConfig(windows=2, seqlen=16, progress=False, interventions=False, plots=False)
    an = analyze(m, tok, cfg, windows=random_windows(2, 16, len(tok)))
    s = an.summary
    assert s["family"] == "gemma3" and "interventions" not in s
    assert s["super_weights"]["post_norm_note"]
    assert set(s["difficulty"]["weights"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    write_outputs(an, tmp_path / "g")
    assert json.loads((tmp_path / "g" / "analysis.json").read_text())["family"] == "gemma3"


def test_cli_analyze(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    from llmpress.cli import main

    out = tmp_path / "an"
    rc = main(
        [
            "analyze",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--windows",
            "2",
            "--seqlen",
            "16",
            "--data",
            str(tiny_text_file),
            "--no-progress",
            "--no-interventions",
            "--layers",
            "1",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "llmpress analyze" in text and "report:" in text
    assert (out / "report.html").exists() and (out / "analysis.json").exists()
    assert json.loads((out / "analysis.json").read_text())["layers_3d"] == [1]
    rc = main(
        [
            "analyze",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "bad"),
            "--windows",
            "1",
            "--seqlen",
            "16",
            "--data",
            str(tiny_text_file),
            "--no-progress",
            "--no-interventions",
            "--layers",
            "7",
        ]
    )
    assert rc == 2 and "out of range" in capsys.readouterr().err


def test_analyze_shares_windows_among_sources(tiny_model_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    """`--data a,b` analyzes windows of both texts (shared by largest remainder, in order); a
    missing file in the list exits 2 before the model loads."""
    from llmpress import api, models
    from llmpress.analysis.pipeline import AnalysisConfig, analysis_windows
    from llmpress.cli import main

    other = tmp_path / "digits.txt"
    other.write_text(" ".join(f"{i * 7919 % 100000:05d}" for i in range(3000)))
    model, tok = models.load(str(tiny_model_dir))
    cfg = AnalysisConfig(windows=3, seqlen=16, source=f"{tiny_text_file},{other}")
    windows, counts = analysis_windows(tok, model, cfg)
    assert counts == {str(tiny_text_file): 2, str(other): 1}
    alone = [
        api.evaluation_windows(tok, model, api.EvalConfig(source=str(f), seqlen=16, max_windows=n)) for f, n in ((tiny_text_file, 2), (other, 1))
    ]
    assert torch.equal(windows, torch.cat(alone)) and not torch.equal(alone[0][:1], alone[1])
    out = tmp_path / "an"
    rc = main(
        [
            "analyze",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--windows",
            "3",
            "--seqlen",
            "16",
            "--data",
            cfg.source,
            "--no-progress",
            "--no-interventions",
        ]
    )
    assert rc == 0
    assert json.loads((out / "analysis.json").read_text())["windows_by_source"] == counts
    assert f"3 windows x 16 tokens of {tiny_text_file} 2, {other} 1" in capsys.readouterr().out

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(models, "load", no_load)
    rc = main(["analyze", str(tiny_model_dir), "--data", f"{tiny_text_file},{tmp_path / 'missing.txt'}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.txt" in err and "Traceback" not in err


def test_interventions_report_each_text(tiny_model_dir, tiny_text_file, tmp_path):
    """With windows from several texts every intervention gets a perplexity per text: each one
    is the perplexity of that text's windows alone, the pooled figure is the one over all
    windows, and the ratios are to the same text's unmodified perplexity."""
    from llmpress import models
    from llmpress.analysis.interventions import _source_slices
    from llmpress.analysis.report import intervention_table
    from llmpress.eval.perplexity import perplexity

    other = tmp_path / "digits.txt"
    other.write_text(" ".join(f"{i * 7919 % 100000:05d}" for i in range(3000)))
    model, tok = models.load(str(tiny_model_dir))
    _plant_super_weight(model, 1, 9, 21)
    cfg = AnalysisConfig(windows=3, seqlen=16, source=f"{tiny_text_file},{other}", progress=False, plots=False, attention=False, random_seeds=1)
    an = analyze(model, tok, cfg)
    rows = an.summary["interventions"]["rows"]
    texts = [str(tiny_text_file), str(other)]
    assert [list(r["ppl_by_source"]) for r in rows] == [texts] * len(rows) and len(rows) >= 3
    assert rows[0]["ratio_by_source"] == dict.fromkeys(texts, 1.0)
    from llmpress.analysis.pipeline import analysis_windows

    windows, _ = analysis_windows(tok, model, cfg)
    base = {t: perplexity(model, w) for t, w in zip(texts, (windows[:2], windows[2:]))}
    assert rows[0]["ppl_by_source"] == pytest.approx(base, rel=1e-5)
    assert rows[0]["ppl"] == pytest.approx(perplexity(model, windows), rel=1e-5)
    sw = next(r for r in rows if r["name"] == "super weights -> 0")
    for t in texts:
        assert sw["ratio_by_source"][t] == pytest.approx(sw["ppl_by_source"][t] / base[t], rel=1e-5)
    assert len({round(v, 6) for v in sw["ratio_by_source"].values()}) == 2  # the texts differ
    tab = intervention_table(an.summary)
    assert tab[0][3:5] == [f"{t} ppl (x)" for t in texts] and tab[0][5] == "top-1 next token"
    assert _source_slices({"a": 2}, 2) == {} and _source_slices({"a": 2, "b": 1}, 3) == {"a": (0, 2), "b": (2, 3)}
    with pytest.raises(ValueError, match="do not add up"):
        _source_slices({"a": 2, "b": 2}, 3)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="chromium not installed (CI does not install it)")
def test_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image as mpimg

    tok = tiny_tokenizer()
    m = tiny_llama(vocab=len(tok))
    an = analyze(
        m,
        tok,
        AnalysisConfig(windows=1, seqlen=16, progress=False, interventions=False, tokens_3d=8, layers_3d=(1,)),
        windows=random_windows(1, 16, len(tok)),
    )
    write_outputs(an, tmp_path / "r")
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        (tmp_path / "r" / "report.html").as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    img = mpimg.imread(shot)[..., :3]
    colored = (abs(img[..., 0] - img[..., 1]) + abs(img[..., 1] - img[..., 2]) > 0.1).mean()
    assert colored > 0.003  # the embedded plots rendered (text alone is black/grey on white: ~0)
