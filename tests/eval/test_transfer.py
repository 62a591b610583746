"""Quality beyond the calibration text (issue 22): a channel the calibration text never
activates keeps round-to-nearest weights, so the error on text that does activate it stays
bounded by RTN's."""

from __future__ import annotations

import copy

import torch
from conftest import random_windows, tiny_llama

from llmpress import QuantArgs, api, stage
from llmpress.quant.core import quantize_weight

W4G16 = QuantArgs(bits=4, symmetric=True, granularity="group", group_size=16, observer="minmax")
DEAD = 5  # hidden channel planted dead for calibration


def _logit_error(model, ref, windows) -> float:
    with torch.no_grad():
        return float((model(windows).logits - ref(windows).logits).pow(2).mean())


def test_planted_dead_channel_keeps_out_of_domain_error_bounded():
    fp = tiny_llama(seed=3)
    planted = copy.deepcopy(fp)
    for layer in planted.model.layers:  # calibration text never lights channel DEAD at q/k/v and gate/up
        layer.input_layernorm.weight.data[DEAD] = 0.0
        layer.post_attention_layernorm.weight.data[DEAD] = 0.0
    api.compress(planted, [stage("gptq", weights=W4G16, act_order=True)], random_windows(n=16, seqlen=32, seed=1))
    rtn = copy.deepcopy(fp)
    api.compress(rtn, [stage("rtn", weights=W4G16)])
    gptq = copy.deepcopy(fp)  # the GPTQ weights on the real model, where the channel is alive
    zeroed = copy.deepcopy(fp)  # what zeroing dead columns (the GPTQ reference code) would give
    for name, mod in planted.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            w = gptq.get_submodule(name).weight.data
            w.copy_(mod.weight.data)
            ref, _ = quantize_weight(fp.get_submodule(name).weight.data, W4G16)
            assert torch.equal(w[:, DEAD], ref[:, DEAD]), name  # the dead column is RTN of the original
            zeroed.get_submodule(name).weight.data.copy_(w)
            zeroed.get_submodule(name).weight.data[:, DEAD] = 0.0
    test = random_windows(n=8, seqlen=32, seed=9)
    err_gptq, err_rtn, err_zeroed = (_logit_error(m, fp, test) for m in (gptq, rtn, zeroed))
    assert err_gptq < 2.0 * err_rtn
    assert err_zeroed > 2.0 * err_gptq


def test_reference_is_the_data_free_counterpart_scored_in_place():
    from llmpress.arch import get_arch
    from llmpress.eval.perplexity import perplexity
    from llmpress.eval.reference import describe, reference_recipe, swapped_weights
    from llmpress.recipe import load_recipe

    assert describe(reference_recipe(load_recipe("gptq-w4g64"))) == "RTN W4 g64"
    assert describe(reference_recipe(load_recipe("sparsegpt-50-w4g64"))) == "magnitude 50% + RTN W4 g64"
    assert describe(reference_recipe(load_recipe("wanda-2of4"))) == "magnitude 2:4"
    for name in ("rtn-w4g64", "smoothquant-w8a8", "quarot-w4a8"):  # data-free, or no data-free twin
        assert reference_recipe(load_recipe(name)) is None
    model, windows = tiny_llama(seed=1), random_windows(n=4, seqlen=32, seed=2)
    ref = reference_recipe(load_recipe("gptq-w4g64"))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with swapped_weights(model, ref, get_arch(model).blocks):
        hooked = perplexity(model, windows, 1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # put back
    copy_ = copy.deepcopy(model)
    api.compress(copy_, ref)
    assert hooked == perplexity(copy_, windows, 1)
    assert hooked != perplexity(model, windows, 1)


def test_held_out_warning_when_the_gain_does_not_transfer():
    from llmpress.eval.reference import held_out_warnings

    ref = {"wiki": 30.0, "news": 40.0, "code": 12.0}
    good = {"wiki": 25.0, "news": 34.0, "code": 10.5}  # gains: ln(30/25)=0.18, 0.16, 0.13
    assert held_out_warnings(calib_sources=("wiki",), compressed=good, reference=ref, method="gptq") == []
    bad = {"wiki": 25.0, "news": 34.0, "code": 11.5}  # code gain 0.043 < half of 0.18
    (line,) = held_out_warnings(calib_sources=("wiki",), compressed=bad, reference=ref, method="gptq")
    assert line.startswith("gptq's gain over its data-free counterpart on code is 23% of its gain on wiki")
    assert held_out_warnings(calib_sources=("wiki", "code"), compressed=bad, reference=ref, method="gptq") == []
    assert held_out_warnings(calib_sources=("news",), compressed={"wiki": 25.0}, reference=ref, method="gptq") == []
    (worse,) = held_out_warnings(calib_sources=("wiki",), compressed={"wiki": 31.0}, reference=ref, method="gptq")
    assert "no better than its data-free counterpart on wiki" in worse


def test_compress_with_several_sources_measures_the_reference_and_warns(tmp_path, capsys, monkeypatch):
    """`llmpress compress` with the calibration text among several evaluation sources scores the
    data-free counterpart on each (before compressing) and prints the held-out warnings."""
    import json

    from conftest import TINY_TEXT, save_tiny_model

    from llmpress.cli import main
    from llmpress.eval.reference import held_out_warnings, reference_recipe
    from llmpress.recipe import load_recipe

    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_model(tmp_path / "m")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TINY_TEXT * 3)
    b.write_text(" ".join(f"{i * 7919 % 100000:05d}" for i in range(3000)))
    out = tmp_path / "r.json"
    rc = main(
        [
            "compress",
            str(model_dir),
            "--recipe",
            "gptq-w4g64",
            "--calib-data",
            str(a),
            "--eval-data",
            f"{a},{b}",
            "--calib-samples",
            "8",
            "--calib-seqlen",
            "32",
            "--seqlen",
            "32",
            "--eval-windows",
            "3",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    rep = json.loads(out.read_text())
    ref = rep["reference"]
    assert ref["recipe"] == "RTN W4 g64" and list(ref["ppl_by_source"]) == [str(a), str(b)]
    # the reference equals compressing with the counterpart recipe, scored on the same windows
    same = api.run_pipeline(
        str(model_dir),
        reference_recipe(load_recipe("gptq-w4g64")),
        evaluation=api.EvalConfig(source=f"{a},{b}", seqlen=32, max_windows=3),
        engine=api.EngineOptions(progress=False),
    )
    assert same.compressed["ppl_by_source"] == ref["ppl_by_source"]
    assert same.reference is None  # data-free recipes have no counterpart to beat
    # the reference pass is its own memory phase (and absent when nothing is measured)
    assert [p["phase"] for p in rep["memory"]["phases"]][3:5] == ["baseline_eval", "reference_eval"]
    assert "reference_eval" not in [p["phase"] for p in same.memory["phases"]]
    expected = held_out_warnings(
        calib_sources=(str(a),), compressed=rep["compressed"]["ppl_by_source"], reference=ref["ppl_by_source"], method="gptq"
    )
    assert ref["warnings"] == expected
    printed = capsys.readouterr()
    assert all(f"llmpress: warning: {w}" in printed.err for w in expected)
    assert f"RTN W4 g64 ({b})" in printed.out  # the table shows the counterpart per source


def test_reference_swap_is_undone_when_a_forward_fails():
    from llmpress.arch import get_arch
    from llmpress.eval.reference import reference_recipe, swapped_weights
    from llmpress.recipe import load_recipe

    model = tiny_llama(seed=2)
    before = {n: p.clone() for n, p in model.named_parameters()}
    lin = model.model.layers[0].mlp.down_proj
    boom = lin.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")), prepend=True)
    try:
        with swapped_weights(model, reference_recipe(load_recipe("gptq-w4g64")), get_arch(model).blocks):
            model(random_windows(n=1, seqlen=8))
    except RuntimeError:
        pass
    boom.remove()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
