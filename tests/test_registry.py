"""The method registry: methods are found without a hand-kept list, by name (lazily) and by config type.

The toy method below is the whole diff a new method needs: one file holding its config,
its pure function and a thin handler. Nothing else in the package names it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_llama
from helpers import weights_copy

from llmpress import RecipeError, compress, registry, stage
from llmpress.recipe import Recipe
from llmpress.registry import METHODS, ModuleContext, get_method, load_all, method_for_config, method_index, register


# ----------------------------------------------------------------------------- a new method, in one file
@dataclass(frozen=True)
class ToyScale:
    """Multiply the targeted weights by ``factor``."""

    factor: float = 0.5


def toy_scale(weight: torch.Tensor, factor: float) -> torch.Tensor:
    return weight * factor


@register("toy_scale", ToyScale, summary="test: scale the weights")
def _toy_scale(ctx: ModuleContext, cfg: ToyScale) -> None:
    ctx.set_weight(toy_scale(ctx.weight, cfg.factor))
    ctx.record.notes["toy_factor"] = cfg.factor


DOWN = "re:.*mlp\\.down_proj"


@pytest.mark.parametrize("how", ["name", "config", "yaml"])
def test_a_method_defined_in_one_file_runs_through_compress(how):
    m = tiny_llama()
    before = weights_copy(m)
    if how == "name":
        recipe = [stage("toy_scale", factor=0.25, targets=[DOWN])]
    elif how == "config":
        recipe = [stage(ToyScale(factor=0.25), targets=[DOWN])]
    else:
        recipe = Recipe.from_yaml(f"stages:\n  - method: toy_scale\n    factor: 0.25\n    targets: ['{DOWN}']\n")
    rep = compress(m, recipe)
    after = weights_copy(m)
    scaled = [n for n in before if not torch.equal(before[n], after[n])]
    assert sorted(scaled) == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    for n in scaled:
        assert torch.equal(after[n], before[n] * 0.25)
    assert set(rep.layers) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert all(d["methods"] == ["toy_scale"] for d in rep.layers.values())
    assert rep.recipe["stages"][0] == {"method": "toy_scale", "targets": [DOWN], "ignore": ["lm_head"], "factor": 0.25}


def test_lookup_by_name_and_by_config_type_agree():
    m = get_method("toy_scale")
    assert m.config_cls is ToyScale and m.apply is _toy_scale and m.summary == "test: scale the weights"
    assert method_for_config(ToyScale(factor=2.0)) is m
    assert method_for_config(ToyScale) is m
    for name, meth in load_all().items():
        assert method_for_config(meth.config_cls) is meth, name


def test_config_object_and_keywords_do_not_mix():
    with pytest.raises(RecipeError, match="not as keywords"):
        stage(ToyScale(), factor=3.0)

    @dataclass(frozen=True)
    class NotAMethod:
        x: int = 0

    with pytest.raises(RecipeError, match="NotAMethod is not the config of a registered method"):
        stage(NotAMethod())


def test_unknown_method_lists_every_method():
    with pytest.raises(RecipeError) as e:
        get_method("no_such_method")
    listed = str(e.value).split("known methods: ")[1].split(", ")
    assert {
        "rtn",
        "gptq",
        "sparsegpt",
        "awq",
        "smoothquant",
        "quarot",
        "kv_quant",
        "spinquant",
        "duquant",
        "owl",
        "wanda",
        "magnitude",
        "outliers",
        "llm_int8",
        "toy_scale",
    } <= set(listed)


def test_index_matches_what_each_module_registers():
    index = method_index()
    # the package's own methods, each found in its own module by reading the sources
    assert index["rtn"] == "llmpress.quant.rtn" and index["sparsegpt"] == "llmpress.prune.sparsegpt"
    assert index["smoothquant"] == "llmpress.transform.smooth" and index["llm_int8"] == "llmpress.runtime.llm_int8"
    assert {"gptq", "awq", "quarot", "kv_quant", "owl", "wanda", "magnitude", "outliers", "spinquant", "duquant"} <= set(index)
    load_all()
    for name, mod in index.items():
        assert METHODS[name].apply.__module__ == mod, name


def test_a_new_module_in_a_searched_package_is_found_without_being_listed(tmp_path, monkeypatch):
    pkg = tmp_path / "llmpress_toy_plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "halve.py").write_text(
        textwrap.dedent("""
        from dataclasses import dataclass
        from llmpress.registry import register

        @dataclass(frozen=True)
        class Halve:
            pass

        @register("toy_halve", Halve)
        def halve(ctx, cfg):
            ctx.set_weight(ctx.weight / 2)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "PACKAGES", registry.PACKAGES + ["llmpress_toy_plugins"])
    try:
        assert "llmpress_toy_plugins.halve" not in sys.modules
        assert method_index()["toy_halve"] == "llmpress_toy_plugins.halve"
        m = tiny_llama()
        w = m.model.layers[1].self_attn.o_proj.weight.detach().clone()
        compress(m, [stage("toy_halve", targets=["model.layers.1.self_attn.o_proj"])])  # imported here, on lookup
        assert "llmpress_toy_plugins.halve" in sys.modules
        assert torch.equal(m.model.layers[1].self_attn.o_proj.weight, w / 2)
    finally:
        dict.pop(METHODS, "toy_halve", None)
        for k in [k for k in sys.modules if k.startswith("llmpress_toy_plugins")]:
            del sys.modules[k]


def test_registering_a_name_twice_fails():
    with pytest.raises(RuntimeError, match="registered twice"):
        register("toy_scale", ToyScale)(lambda ctx, cfg: None)


def test_parsing_a_recipe_imports_only_the_methods_it_names():
    code = (
        "import json, sys\n"
        "from llmpress.recipe import load_recipe\n"
        "load_recipe('gptq-w4g64'); load_recipe('rtn-w4g64')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('llmpress.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert {"llmpress.quant.gptq", "llmpress.quant.rtn"} <= loaded
    others = set(method_index().values()) - {"llmpress.quant.gptq", "llmpress.quant.rtn"}
    assert not loaded & others, sorted(loaded & others)


def test_membership_finds_a_method_not_imported_yet():
    """``name in METHODS`` in a fresh process: true for a method whose module is not imported yet
    (benchmarks/rotations.py asks before it runs GPTQ rows), false for an unknown name."""
    code = (
        "import sys\n"
        "from llmpress.registry import METHODS\n"
        "before = 'llmpress.quant.gptq' in sys.modules\n"
        "print(before, 'gptq' in METHODS, 'no-such-method' in METHODS, 3 in METHODS)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "False", "False"]
