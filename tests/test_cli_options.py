"""Every parsed CLI flag arrives in the field it belongs to (the positional EngineOptions bug)."""

from __future__ import annotations

import dataclasses

import pytest

from llmpress import api
from llmpress.calib.engine import EngineOptions
from llmpress.cli import build_parser, compress_options, eval_config


def _kw_only_dataclasses():
    import importlib
    import pkgutil

    import llmpress

    out = []
    for info in pkgutil.walk_packages(llmpress.__path__, "llmpress."):
        mod = importlib.import_module(info.name)
        for obj in vars(mod).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == info.name:
                out.append(obj)
    return out


def test_every_dataclass_with_more_than_two_fields_is_keyword_only():
    classes = _kw_only_dataclasses()
    assert len(classes) > 30
    positional = [
        c.__qualname__
        for c in classes
        if len([f for f in dataclasses.fields(c) if f.init]) > 2 and any(not f.kw_only for f in dataclasses.fields(c) if f.init)
    ]
    assert positional == []


def test_compress_flags_reach_their_fields(tmp_path):
    args = build_parser().parse_args(
        [
            "compress",
            "m",
            "--recipe",
            "gptq-w4g64",
            "--out",
            str(tmp_path / "o"),
            "--json",
            str(tmp_path / "r.json"),
            "--batch-size",
            "3",
            "--offload-dir",
            str(tmp_path / "off"),
            "--seed",
            "7",
            "--calib-data",
            "news",
            "--calib-samples",
            "11",
            "--calib-seqlen",
            "33",
            "--eval-windows",
            "5",
            "--seqlen",
            "77",
            "--eval-data",
            "news",
            "--no-true-sequential",
            "--no-progress",
            "--overwrite",
            "--format",
            "hf-fakequant",
        ]
    )
    kw = compress_options(args)
    assert kw["engine"] == EngineOptions(batch_size=3, true_sequential=False, fused=True, offload_dir=str(tmp_path / "off"), progress=False)
    assert kw["calib"] == api.CalibConfig(source="news", n_samples=11, seqlen=33, seed=7, batch_size=3)
    assert kw["evaluation"] == api.EvalConfig(source="news", seqlen=77, max_windows=5)
    assert (kw["model_spec"], kw["recipe"], kw["out"], kw["json_path"]) == ("m", "gptq-w4g64", str(tmp_path / "o"), str(tmp_path / "r.json"))
    assert kw["overwrite"] is True and kw["save_format"] == "hf-fakequant" and kw["device"] == "cpu"


def test_compress_defaults_keep_the_fast_engine_and_progress():
    kw = compress_options(build_parser().parse_args(["compress", "m", "--recipe", "rtn-w4g64"]))
    eng = kw["engine"]
    assert eng.fused is True and eng.progress is True and eng.offload_dir is None and eng.true_sequential is True
    assert eng.batch_size == kw["calib"].batch_size == 8
    assert kw["calib"] == api.CalibConfig()
    assert kw["evaluation"] == api.EvalConfig() and kw["save_format"] == "packed" and kw["overwrite"] is False


def test_no_eval_drops_the_evaluation():
    kw = compress_options(build_parser().parse_args(["compress", "m", "--recipe", "rtn-w4g64", "--no-eval"]))
    assert kw["evaluation"] is None


def test_eval_flags():
    ev = eval_config(build_parser().parse_args(["eval", "d", "--eval-windows", "all", "--seqlen", "128", "--eval-data", "x.txt"]))
    assert ev == api.EvalConfig(source="x.txt", seqlen=128, max_windows=None)


@pytest.mark.parametrize("cls", [api.CalibConfig, api.EvalConfig, EngineOptions])
def test_positional_construction_is_refused(cls):
    with pytest.raises(TypeError):
        cls(1, 2, 3)
