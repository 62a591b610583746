"""The benchmark rows say what they run: variant recipes differ from their preset only where the label says."""

import json

import pytest
from bench_scripts import load_script

from llmpress import api


def _stages(recipe):
    return api._as_recipe(recipe).stages


@pytest.mark.parametrize("preset", ["quarot-w4a4kv4-gptq", "duquant-w4a4kv4-gptq", "spinquant-w4a4kv4-gptq"])
def test_domains_rotation_gptq_variants_change_only_the_gptq_stage(preset):
    domains = load_script("domains")
    base = _stages(preset)
    cases = {f"{preset}-natural": (False, 0.01), f"{preset}-act-order": (True, 0.01), f"{preset}-act-order-damp0.3": (True, 0.3)}
    for name, (act_order, damp) in cases.items():
        recipe, engine = domains.VARIANTS[name]
        got = _stages(recipe)
        assert [s.method for s in got] == [s.method for s in base]
        assert engine == {}
        for old, new in zip(base, got):
            if new.method == "gptq":
                assert (new.config.act_order, new.config.static_groups, new.config.damp) == (act_order, True, damp)
                assert new.config.weights == old.config.weights and new.config.activations == old.config.activations
            else:
                assert new.config == old.config
        counterpart = "quarot-w4a4kv4-rtn" if preset.startswith("quarot") else f"{preset}-as-rtn"
        assert name in domains.README_ROWS and domains.README_ROWS[name][1] == counterpart
    # the RTN counterpart: the same stages, round to nearest on the GPTQ stage's grid and activations
    rtn = _stages(domains.VARIANTS[f"{preset}-as-rtn"][0])
    assert [s.method for s in rtn] == [("rtn" if s.method == "gptq" else s.method) for s in base]
    for old, new in zip(base, rtn):
        if old.method == "gptq":
            assert new.config.weights == old.config.weights and new.config.activations == old.config.activations
            assert new.targets == old.targets and new.ignore == old.ignore
        else:
            assert new.config == old.config


def test_rotation_presets_settings_and_counterparts():
    # quarot's preset is the setting its README row names (activation order, damp 0.3)
    gptq = next(s for s in _stages("quarot-w4a4kv4-gptq") if s.method == "gptq")
    assert (gptq.config.act_order, gptq.config.damp) == (True, 0.3)
    # so is duquant's since 2026-12-05, and the README row that names the preset is that variant's
    gptq = next(s for s in _stages("duquant-w4a4kv4-gptq") if s.method == "gptq")
    assert (gptq.config.act_order, gptq.config.static_groups, gptq.config.damp) == (True, True, 0.3)
    domains = load_script("domains")
    named = [k for k, (label, _) in domains.README_ROWS.items() if "(`duquant-w4a4kv4-gptq`)" in label]
    assert named == ["duquant-w4a4kv4-gptq-act-order-damp0.3"]
    assert "until 2026-12-05" in domains.README_ROWS["duquant-w4a4kv4-gptq-natural"][0]
    # spinquant's preset keeps natural order and damp 0.01 (the held-out rule's choice, 2026-12-06), and
    # its README row that names the preset is the natural-order variant's
    gptq = next(s for s in _stages("spinquant-w4a4kv4-gptq") if s.method == "gptq")
    assert (gptq.config.act_order, gptq.config.damp) == (False, 0.01)
    named = [k for k, (label, _) in domains.README_ROWS.items() if "(`spinquant-w4a4kv4-gptq`)" in label]
    assert named == ["spinquant-w4a4kv4-gptq-natural"]
    # spinquant's RTN counterpart is the spinquant-w4a4kv4 preset itself
    got = _stages(domains.VARIANTS["spinquant-w4a4kv4-gptq-as-rtn"][0])
    want = _stages("spinquant-w4a4kv4")
    assert [(s.method, s.config) for s in got] == [(s.method, s.config) for s in want]


class _Recorder:
    extra = True

    def __init__(self):
        self.rows = {}

    def run(self, section, label, recipe, **kw):
        self.rows[label] = _stages(recipe)
        return {}


def test_outliers_awq_section_rows_match_their_labels():
    outliers = load_script("outliers")
    r = _Recorder()
    outliers.awq(r)
    preset = _stages("awq-gptq-w3g64")
    assert not preset[0].config.clip and preset[1].config == _stages("gptq-w3g64")[0].config  # GPTQ as gptq-w3g64
    clip = r.rows["AWQ scales + clip search + GPTQ W3 g64"]
    assert clip[0].config.clip and clip[1].config == preset[1].config
    old_gptq = r.rows["GPTQ W3 g64, damp 0.01 (the old gptq-w3g64)"]
    assert [s.method for s in old_gptq] == ["gptq"] and old_gptq[0].config.damp == 0.01
    old_awq_gptq = r.rows["AWQ scales + GPTQ W3 g64, damp 0.01 (the old awq-gptq-w3g64)"]
    assert old_awq_gptq[0].config == preset[0].config and old_awq_gptq[1].config.damp == 0.01
    assert old_awq_gptq[1].config.weights == preset[1].config.weights


def test_outliers_readme_table_one_row_per_label_with_ratios(tmp_path):
    outliers = load_script("outliers")
    fp = {"wiki": 10.0, "news": 20.0}

    def row(section, method, wiki, news, model="smollm2-135m"):
        return {"model": model, "section": section, "method": method, "ppl_by_source": {"wiki": wiki, "news": news}, "bits_per_weight": 3.25}

    rows = [row("baseline", "full precision (fp32)", *fp.values()), row("awq", "RTN W3 g64", 30.0, 80.0),
            row("outliers", "RTN W3 g64", 31.0, 81.0), row("prune", "Wanda 2:4 (sequential)", 15.0, 50.0),
            row("baseline", "full precision (fp32)", 7.0, 7.0, model="gemma3-270m")]  # fmt: skip
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"rows": rows}))
    lines = outliers.readme_table(path, "smollm2-135m").splitlines()
    assert lines[2] == "| full precision (fp32) | 10.000 | 20.000 | 16 |"
    assert lines[3] == "| RTN W3 g64 (`rtn-w3g64`) | 30.000 (3.000x) | 80.000 (4.000x) | 3.25 |"  # the first row of a label
    assert lines[4].startswith("| Wanda 2:4, sequential (`wanda-2of4`) | 15.000 (1.500x) | 50.000 (2.500x)")
    assert len(lines) == 5
    only = outliers.readme_table(path, "smollm2-135m", ["prune"]).splitlines()
    assert len(only) == 4 and "wanda-2of4" in only[3]


def test_domains_sparsegpt_ablations_change_only_mask_scope_and_refit():
    domains = load_script("domains")
    cases = {"sparsegpt-50-block-masks": ("sparsegpt-50", False, False), "sparsegpt-50-no-refit": ("sparsegpt-50", True, False),
             "sparsegpt-2of4-no-refit": ("sparsegpt-2of4", None, False)}  # fmt: skip
    for name, (preset, per_row, refit) in cases.items():
        (old,), (new,) = _stages(preset), _stages(domains.VARIANTS[name][0])
        assert new.config.refit is refit and old.config.refit is True
        if per_row is not None:
            assert new.config.per_row is per_row
        same = {k: v for k, v in vars(old.config).items() if k not in ("refit", "per_row")}
        assert same == {k: v for k, v in vars(new.config).items() if k not in ("refit", "per_row")}
        assert name in domains.README_ROWS


def test_shrink_variants_cover_every_gptq_preset_and_change_only_shrink():
    """``<preset>-shrink<s>`` exists for every preset with a GPTQ or SparseGPT sweep (a new preset
    cannot be left out of the held-out rule's candidates) and differs from it in that stage's
    shrink only."""
    from llmpress.recipe import presets

    domains = load_script("domains")
    sweeps = {p for p in presets() if any(s.method in ("gptq", "kquant") for s in _stages(p))}
    assert sweeps == set(domains.GPTQ_PRESETS)
    pruners = {p for p in presets() if any(s.method == "sparsegpt" for s in _stages(p))}
    assert pruners == set(domains.SPARSEGPT_PRESETS)
    for p in sweeps | pruners:
        base, got = _stages(p), _stages(domains.VARIANTS[f"{p}-shrink0.5"][0])
        assert [s.method for s in got] == [s.method for s in base]
        for old, new in zip(base, got):
            if new.method in ("gptq", "kquant", "sparsegpt"):
                assert new.config.shrink == 0.5
                assert {k: v for k, v in vars(new.config).items() if k != "shrink"} == {k: v for k, v in vars(old.config).items() if k != "shrink"}
            else:
                assert new.config == old.config
