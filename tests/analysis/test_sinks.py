"""The attention-sink view on tiny random models: probabilities equal eager attention's, a planted
sink is found with its massive activation, the statistics are what their definitions say, CLI."""

import json

import pytest
import torch
import torch.nn as nn
from conftest import random_windows, tiny_gemma3, tiny_llama, tiny_tokenizer

from llmpress.analysis import AnalysisConfig, analyze, sinks
from llmpress.analysis.sinks import LayerAttention, SinkStats, attention_of, attention_probs


@pytest.mark.parametrize("make", [lambda: tiny_llama(), lambda: tiny_gemma3(layers=6)], ids=["llama", "gemma3"])
def test_probabilities_equal_eager_attention(make):
    """GQA (4 query heads, 2 kv heads), RoPE, gemma3's q/k norms, its query_pre_attn_scalar scaling
    and its sliding window (16 < 32 tokens) on five layers, full attention on the sixth."""
    m = make()
    ids = random_windows(3, 32)
    mine = attention_of(m, ids)  # under the default sdpa attention: nothing read from output_attentions
    m.set_attn_implementation("eager")
    with torch.no_grad():
        ref = m(ids, output_attentions=True, use_cache=False).attentions
    assert len(mine) == len(ref) == m.config.num_hidden_layers
    for la, r in zip(mine, ref):
        assert la.probs().shape == r.shape == (3, 4, 32, 32)
        assert torch.allclose(la.probs(), r.float(), atol=1e-5, rtol=0)
        assert torch.equal(la.probs(5, 9), la.probs()[:, :, 5:9])  # a chunk of queries
    types = getattr(m.config, "layer_types", None)
    if types:  # the window really cuts: query 31 sees keys 16..31 only on sliding layers
        assert types[0] == "sliding_attention" and types[5] == "full_attention"
        assert float(mine[0].probs()[..., 31, :16].abs().max()) == 0.0
        assert float(mine[5].probs()[..., 31, :16].sum(-1).min()) > 0.0


@pytest.mark.parametrize("chunk", [256, 5])
def test_uniform_attention_gives_the_uniform_baseline(chunk, monkeypatch):
    """q = 0: every query spreads evenly over the keys it sees; the mass on token 0 is then the mean
    of 1/(i+1) over queries i >= 4, on the first 4 keys the mean of min(4, i+1)/(i+1)."""
    B, H, KV, T, D = 2, 4, 2, 12, 8
    q, k = torch.zeros(B, H, T, D), torch.randn(B, KV, T, D)
    v = torch.randn(B, KV, T, D)
    p = attention_probs(q, k, scaling=0.3)
    assert torch.allclose(p.sum(-1), torch.ones(B, H, T))
    assert torch.allclose(p[0, 0, 5], torch.tensor([1 / 6] * 6 + [0.0] * 6))
    monkeypatch.setattr(sinks, "QUERY_CHUNK", chunk)  # 5: queries 4..8 and 9..11 in two softmaxes
    st = SinkStats(1)
    st.update(0, LayerAttention(q=q, k=k, v=v, scaling=0.3))
    u0, uk = st.uniform()
    assert u0 == pytest.approx(sum(1 / (i + 1) for i in range(4, T)) / (T - 4))
    assert uk == pytest.approx(sum(4 / (i + 1) for i in range(4, T)) / (T - 4))
    assert torch.allclose(st.mass0[0] / B, torch.full((H,), u0, dtype=torch.float64))
    assert torch.allclose(st.massk[0] / B, torch.full((H,), uk, dtype=torch.float64))
    w = attention_probs(q, k, scaling=0.3, window=3)  # keys i-2..i
    assert torch.allclose(w[0, 0, 7], torch.tensor([0.0] * 5 + [1 / 3] * 3 + [0.0] * 4))


SINK_TOKEN, CHANNEL = 5, 11


def _plant_sink(m, layer: int, heads: list[int]) -> None:
    """Query heads ``heads`` of ``layer`` attend to token 0: their q is a constant on the rotary
    dimension that turns slowest (D/2 - 1: RoPE barely moves it over 32 positions), and their key
    head's k on that dimension reads channel CHANNEL, which the first token's embedding makes huge
    (a massive activation at token 0 of the residual, from the embedding on)."""
    attn = m.model.layers[layer].self_attn
    D, groups = attn.head_dim, attn.num_key_value_groups
    with torch.no_grad():
        m.model.embed_tokens.weight[SINK_TOKEN, CHANNEL] = 100.0
        qp = nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=True)
        qp.weight.copy_(attn.q_proj.weight)
        qp.bias.zero_()
        for h in heads:
            qp.weight[h * D + D // 2 - 1] = 0.0
            qp.bias[h * D + D // 2 - 1] = 10.0
        attn.q_proj = qp
        for kv in {h // groups for h in heads}:
            attn.k_proj.weight[kv * D + D // 2 - 1] = 0.0
            attn.k_proj.weight[kv * D + D // 2 - 1, CHANNEL] = 5.0


def _sink_windows(n=4, T=32, vocab=256):
    w = random_windows(n, T, vocab)
    w[w == SINK_TOKEN] = SINK_TOKEN + 1
    w[:, 0] = SINK_TOKEN
    return w


def test_planted_sink_found_with_its_massive_activation():
    tok = tiny_tokenizer()
    m = tiny_llama(vocab=len(tok))
    _plant_sink(m, 0, [0])  # one head of layer 0
    _plant_sink(m, 1, [0, 1, 2, 3])  # every head of layer 1
    w = _sink_windows(vocab=len(tok))
    # the planted model still agrees with eager attention
    mine = attention_of(m, w[:2])
    m.set_attn_implementation("eager")
    with torch.no_grad():
        ref = m(w[:2], output_attentions=True, use_cache=False).attentions
    for la, r in zip(mine, ref):
        assert torch.allclose(la.probs(), r, atol=1e-5, rtol=0)
    cfg = AnalysisConfig(windows=4, seqlen=32, progress=False, interventions=False, plots=False)
    a = analyze(m, tok, cfg, windows=w).summary["attention_sinks"]
    l0, l1 = a["per_layer"]
    assert a["mass0"][0][0] > 0.99 and max(a["mass0"][0][1:]) < 0.5
    assert (l0["mass0_max_head"], l0["mass0_max"]) == (0, a["mass0"][0][0]) and l0["mass0_mean"] < 0.5
    assert min(a["mass0"][1]) > 0.99 and l1["mass0_mean"] > 0.99 and l1["first_k_mean"] >= l1["mass0_mean"]
    assert a["sink_layers"] == [1] and a["top_layers"][0]["layer"] == 1
    assert a["uniform_mass0"] == pytest.approx(sum(1 / (i + 1) for i in range(4, 32)) / 28, rel=1e-3)
    # token 0's key is huge on the planted kv heads of layer 1; its query is not (a constant bias)
    assert min(a["head_norm_ratios"]["k"][1]) > 5 and l1["k_ratio"] > 5
    # the planted rotary dimension D/2 - 1 = 7 carries the largest q and k values of every token
    assert l1["q_dim_peak_at"][1] == 7 and l1["k_dim_peak_at"][1] == 7 and l1["k_dim_peak"] > 10
    assert a["link"]["corr_log_h0_mass0"] is None  # two layers: too few for a correlation
    # the link: massive at token 0, channel CHANNEL, in the residual from block 0 on, entering the onset layer 1
    link = a["link"]
    assert link["onset_layer"] == 1 and link["first_massive_layer_tok0"] == 0 and link["massive_before_onset"] is True
    assert link["massive_pair_tok0"]["channel"] == CHANNEL and link["massive_pair_tok0"]["layers"] == [0, 1]
    assert link["entering_onset"]["massive"]["channel"] == CHANNEL
    assert link["entering_onset"]["massive"]["value"] == pytest.approx(100, rel=0.05)
    assert l1["massive_in"]["channel"] == CHANNEL and l0["massive_in"] is None
    assert l0["h0_in"] == pytest.approx(100, rel=1e-3) and l0["h0_in_over_median"] > 1000


def test_correlation_of_token0_magnitude_and_mass():
    from llmpress.analysis.sinks import _corr

    assert _corr([1.0, 10.0, 100.0], [0.1, 0.3, 0.5]) == pytest.approx(1.0)
    assert _corr([100.0, 10.0, 1.0], [0.1, 0.3, 0.5]) == pytest.approx(-1.0)
    assert _corr([1.0, None, 100.0], [0.1, 0.3, 0.5]) is None  # fewer than 3 layers with a magnitude


def test_norm_ratios_are_token0_over_the_median_of_the_others():
    m = tiny_llama()
    w = random_windows(3, 16)
    st = SinkStats(2)
    las = attention_of(m, w)
    for li, la in enumerate(las):
        st.update(li, la)
    for li, la in enumerate(las):
        for name in ("q", "k", "v"):
            x = getattr(la, name)  # [B, n, T, D]
            whole = x.transpose(1, 2).flatten(2).norm(dim=-1)  # [B, T]
            per_head = x.norm(dim=-1)  # [B, n, T]
            h0, hmed, w0, wmed = st.norms[name][li]
            assert float(w0) == pytest.approx(float(whole[:, 0].sum()), rel=1e-6)
            assert float(wmed) == pytest.approx(float(whole[:, 1:].median(-1).values.sum()), rel=1e-6)
            assert torch.allclose(h0.float(), per_head[:, :, 0].sum(0), rtol=1e-6)
            assert torch.allclose(hmed.float(), per_head[:, :, 1:].median(-1).values.sum(0), rtol=1e-6)
            assert torch.allclose(st.dim_abs[name][li].float(), x[:, :, 1:].abs().sum((0, 2)), rtol=1e-5)
    # RoPE is a rotation: q and k norms after it are those of the projections' outputs
    attn = m.model.layers[0].self_attn
    got = {}
    hooks = [attn.q_proj.register_forward_hook(lambda mod, i, o: got.__setitem__("q", o))]
    try:
        with torch.no_grad():
            m(w, use_cache=False)
    finally:
        hooks[0].remove()
    qn = got["q"].view(3, 16, 4, 16).transpose(1, 2).norm(dim=-1)
    assert torch.allclose(las[0].q.norm(dim=-1), qn, rtol=1e-5)


def _analyze(main, model_dir, text, out, *extra):
    args = ["analyze", str(model_dir), "--out", str(out), "--windows", "2", "--seqlen", "16", "--data", str(text)]
    return main(args + ["--no-progress", "--no-interventions", "--layers", "1", *extra])


def test_cli_analyze_attention_on_by_default_and_off_with_the_flag(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    from llmpress.cli import main

    assert _analyze(main, tiny_model_dir, tiny_text_file, tmp_path / "on") == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "on" / "analysis.json").read_text())
    a = data["attention_sinks"]
    assert [r["layer"] for r in a["per_layer"]] == [0, 1] and len(a["mass0"]) == 2 and len(a["mass0"][0]) == 4
    assert all(0 <= v <= 1 for row in a["mass0"] for v in row)
    assert len(a["head_norm_ratios"]["q"][0]) == 4 and len(a["head_norm_ratios"]["k"][0]) == 2
    assert {"onset_layer", "first_massive_layer_tok0", "massive_pair_tok0", "entering_onset"} <= set(a["link"])
    assert "attention" in data["seconds"] and data["config"]["attention"] is True
    assert (tmp_path / "on" / "img" / "attention_sinks.png").stat().st_size > 1000
    html = (tmp_path / "on" / "report.html").read_text()
    assert "<h2>Attention sinks</h2>" in html and "Attention mass on token 0" in html
    assert "Attention sink: queries give token 0" in printed and "At token 0 of layer" in printed
    assert _analyze(main, tiny_model_dir, tiny_text_file, tmp_path / "off", "--no-attention") == 0
    data = json.loads((tmp_path / "off" / "analysis.json").read_text())
    assert "attention_sinks" not in data and "attention" not in data["seconds"]
    assert not (tmp_path / "off" / "img" / "attention_sinks.png").exists()
    assert "Attention sinks" not in (tmp_path / "off" / "report.html").read_text()


@pytest.mark.slow
def test_smollm2_attention_sink_follows_the_massive_activation():
    from llmpress import models

    model, tok = models.load("smollm2-135m")
    cfg = AnalysisConfig(windows=2, seqlen=256, interventions=False, plots=False, progress=False)
    a = analyze(model, tok, cfg).summary["attention_sinks"]
    mass = [r["mass0_mean"] for r in a["per_layer"]]
    assert len(a["mass0"]) == 30 and len(a["mass0"][0]) == 9
    assert max(mass[:2]) < 0.03 and min(mass[12:29]) > 0.2 and max(mass) > 0.5  # no sink at the bottom, one from layer 12
    assert mass[11] < 0.05 < 0.1 < min(mass[3:10])  # it follows token 0's ~700 at layers 3-9, gone at 11
    link = a["link"]
    assert link["massive_pair_tok0"]["channel"] == 507 and link["first_massive_layer_tok0"] <= 3
    assert 12 <= link["onset_layer"] <= 16 and link["massive_before_onset"] and link["corr_log_h0_mass0"] > 0.7
    assert link["entering_onset"]["massive"]["channel"] == 507 and link["entering_onset"]["h0"] > 1.5e4
    assert all(r["k_ratio"] < 0.6 and r["v_ratio"] < 0.6 for r in a["per_layer"][12:29])  # token 0's q/k/v are small
    assert min(a["dim_peak_mean"]["q"], a["dim_peak_mean"]["k"]) > 2 * a["dim_peak_mean"]["v"]
