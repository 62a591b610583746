"""Recipes (llmpress.recipe): YAML parsing, the round trip through to_yaml, errors that name
the bad key and where it is, stage() keywords, target matching, load_recipe's three inputs."""

from __future__ import annotations

import pytest

from llmpress.errors import RecipeError
from llmpress.quant import QuantArgs
from llmpress.recipe import Recipe, Stage, load_recipe, presets, stage

W4 = QuantArgs(bits=4, group_size=64)

YAML = """\
name: mine
description: GPTQ on attention, RTN on the MLP
stages:
  - method: gptq
    targets: ['re:.*self_attn\\.(q|k|v|o)_proj']
    weights: {bits: 3, group_size: 32}
  - method: rtn
    targets: re:.*mlp\\..*
    ignore: [lm_head, model.layers.0.mlp.down_proj]
    weights: {bits: 4, group_size: 64, symmetric: false}
"""


def test_yaml_parses_into_stages_with_their_configs():
    r = Recipe.from_yaml(YAML)
    assert r.name == "mine" and r.description == "GPTQ on attention, RTN on the MLP"
    assert [s.method for s in r.stages] == ["gptq", "rtn"]
    gptq, rtn = r.stages
    assert gptq.targets == ("re:.*self_attn\\.(q|k|v|o)_proj",) and gptq.ignore == ("lm_head",)  # default ignore
    assert (gptq.config.weights.bits, gptq.config.weights.group_size) == (3, 32)
    assert rtn.targets == ("re:.*mlp\\..*",)  # a single pattern becomes a one-item tuple
    assert rtn.ignore == ("lm_head", "model.layers.0.mlp.down_proj")
    assert rtn.config.weights == QuantArgs(bits=4, group_size=64, symmetric=False)


def test_defaults_of_a_minimal_recipe():
    r = Recipe.from_yaml("stages:\n  - method: rtn\n")
    assert (r.name, r.description) == ("custom", "")
    (s,) = r.stages
    assert (s.method, s.targets, s.ignore) == ("rtn", ("Linear",), ("lm_head",))


def test_yaml_round_trip_is_exact():
    r = Recipe.from_yaml(YAML)
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r
    assert again.to_dict() == r.to_dict()
    assert again.to_yaml() == r.to_yaml()


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_round_trips(name):
    r = load_recipe(name)
    assert r.stages and Recipe.from_yaml(r.to_yaml()) == r
    assert r.name == name  # the file's name field matches its file name


@pytest.mark.parametrize("text, fragments", [
    ("- method: rtn\n", ["recipe: expected a mapping with a 'stages' list, got list"]),
    ("stages: [{method: rtn}]\nstagse: []\n", ["recipe: unknown field(s) stagse", "name, description, stages"]),
    ("name: x\n", ["recipe.stages: expected a non-empty list of stages"]),
    ("stages: []\n", ["recipe.stages: expected a non-empty list of stages"]),
    ("stages: [rtn]\n", ["recipe.stages[0]: expected a mapping with a 'method' field"]),
    ("stages: [{targets: [Linear]}]\n", ["recipe.stages[0]: missing field 'method'"]),
    ("stages: [{method: rtn}, {method: gtpq}]\n", ["recipe.stages[1].method: unknown method 'gtpq'", "gptq"]),
    ("stages: [{method: rtn, wieghts: {bits: 4}}]\n", ["recipe.stages[0]", "unknown field(s) wieghts", "weights"]),
    ("stages: [{method: rtn, weights: {bits: 4, group_sise: 64}}]\n", ["recipe.stages[0].weights", "group_sise"]),
    ("stages: [{method: rtn, targets: [1, 2]}]\n", ["recipe.stages[0].targets: expected a module name"]),
    ("stages: [{method: rtn, ignore: 're:('}]\n", ["recipe.stages[0].ignore: bad regular expression 're:('"]),
    ("stages: [{method: rtn\n", ["recipe: malformed YAML at line 2, column 1"]),
])  # fmt: skip
def test_errors_name_the_bad_key_and_where(text, fragments):
    with pytest.raises(RecipeError) as ei:
        Recipe.from_yaml(text)
    for f in fragments:
        assert f in str(ei.value), (f, str(ei.value))


def test_error_location_uses_the_given_source_name():
    with pytest.raises(RecipeError, match=r"^my\.yaml\.stages\[0\]: missing field 'method'$"):
        Recipe.from_yaml("stages: [{}]\n", where="my.yaml")


def test_stage_keywords_become_the_config():
    s = stage("rtn", weights=W4, targets=["re:.*down_proj"], ignore=())
    assert s == Stage(method="rtn", config=s.config, targets=("re:.*down_proj",), ignore=())
    assert s.config.weights == W4 and s.config.activations is None
    # a QuantArgs keyword and its dict form build the same stage
    assert stage("rtn", weights=W4.to_dict()) == stage("rtn", weights=W4)
    # the same stage as a recipe entry
    assert Recipe.from_dict({"stages": [s.to_dict()]}).stages == (s,)


def test_stage_from_a_config_object_and_its_refusals():
    cfg = stage("gptq", weights=W4).config
    s = stage(cfg)
    assert (s.method, s.config, s.targets, s.ignore) == ("gptq", cfg, ("Linear",), ("lm_head",))
    with pytest.raises(RecipeError, match=r"set the fields in the config object, not as keywords \(weights\)"):
        stage(cfg, weights=W4)
    with pytest.raises(RecipeError, match="unknown method 'gtpq'"):
        stage("gtpq", weights=W4)
    with pytest.raises(RecipeError, match="stage rtn.*unknown field.*bitz"):
        stage("rtn", bitz=4)
    with pytest.raises(RecipeError, match="targets: bad regular expression"):
        stage("rtn", targets=["re:[a-"])


@pytest.mark.parametrize("targets, ignore, name, in_blocks, want", [
    (("Linear",), ("lm_head",), "model.layers.0.mlp.up_proj", True, True),
    (("Linear",), ("lm_head",), "lm_head", False, False),  # outside the blocks: Linear does not reach it
    (("Linear", "lm_head"), (), "lm_head", False, True),  # named exactly
    (("re:.*q_proj",), (), "model.layers.1.self_attn.q_proj", True, True),
    (("re:q_proj",), (), "model.layers.1.self_attn.q_proj", True, False),  # patterns match the whole name
    (("Linear",), ("re:model\\.layers\\.0\\..*",), "model.layers.0.mlp.up_proj", True, False),  # ignore wins
    (("Linear",), ("re:model\\.layers\\.0\\..*",), "model.layers.1.mlp.up_proj", True, True),
])  # fmt: skip
def test_stage_matching(targets, ignore, name, in_blocks, want):
    assert Stage(method="rtn", config=None, targets=targets, ignore=ignore).matches(name, in_blocks) is want


def test_load_recipe_from_a_preset_a_file_or_an_object(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(YAML)
    from_file = load_recipe(str(p))
    assert from_file == Recipe.from_yaml(YAML)
    assert load_recipe(from_file) is from_file
    preset = load_recipe("rtn-w4g64")
    assert preset.stages[0].method == "rtn" and preset.stages[0].config.weights == W4
    assert presets()["rtn-w4g64"].name == "rtn-w4g64.yaml"
    with pytest.raises(RecipeError, match=r"recipe 'rtn-w5' is neither a preset \(.*awq-gptq-w3g64, .*\) nor a YAML file"):
        load_recipe("rtn-w5")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{method: rtn, wieghts: {}}]\n")
    with pytest.raises(RecipeError, match=rf"^{bad}\.stages\[0\]: unknown field"):
        load_recipe(str(bad))
