"""The test shrink (llmpress/shrink.py): environment variables only, recorded, validated."""

from __future__ import annotations

import logging

import pytest
from conftest import shrink_env

import llmpress
from llmpress import models, shrink
from llmpress.api import CalibConfig, EvalConfig, calibration_windows, evaluation_windows
from llmpress.errors import UserError
from llmpress.report import Report


@pytest.fixture
def clean_env(monkeypatch):
    for k in shrink.VARIABLES:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(shrink, "_warned", set())
    return monkeypatch


def test_unset_changes_nothing(clean_env):
    assert shrink.in_force() is None
    assert shrink.cap_windows(64) == 64 and shrink.cap_windows(None) is None and shrink.cap_seqlen(512) == 512
    assert shrink.model_override("smollm2-135m", tuple(models.PACKAGED)) is None
    rep = Report(model="m", recipe={})
    assert rep.to_dict()["test_shrink"] is None and "TEST SHRINK" not in rep.table()


def test_caps_take_the_smaller(clean_env):
    clean_env.setenv(shrink.ENV_WINDOWS, "4")
    clean_env.setenv(shrink.ENV_SEQLEN, "32")
    assert [shrink.cap_windows(n) for n in (64, 2, None)] == [4, 2, 4]
    assert [shrink.cap_seqlen(n) for n in (512, 16)] == [32, 16]


def test_alias_resolves_to_the_folder_and_windows_shrink(clean_env, tiny_alias_folders, caplog):
    for k, v in shrink_env(tiny_alias_folders).items():
        clean_env.setenv(k, v)
    assert models.resolve("gemma3-270m") == (str(tiny_alias_folders["gemma3-270m"]), True)
    with caplog.at_level(logging.WARNING, logger="llmpress.shrink"):
        model, tok = llmpress.load("smollm2-135m")
        calib = calibration_windows(tok, model, CalibConfig(n_samples=128, seqlen=512))
        small = calibration_windows(tok, model, CalibConfig(n_samples=2, seqlen=512))
        ev = evaluation_windows(tok, model, EvalConfig(max_windows=None))
    assert model.config.model_type == "llama" and model.config.hidden_size == 64
    assert model.llmpress_source == "smollm2-135m"
    assert calib.shape == (4, 32) and small.shape == (2, 32) and ev.shape == (4, 32)
    # one warning line per process and setting, naming every variable
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmpress.shrink"]
    assert len(warnings) == 1 and all(k in warnings[0] for k in shrink.VARIABLES), warnings
    rep = Report(model="smollm2-135m", recipe={})
    assert rep.to_dict()["test_shrink"] == shrink_env(tiny_alias_folders)
    assert "TEST SHRINK in force" in rep.table()


@pytest.mark.parametrize(
    "name,value,match",
    [
        (shrink.ENV_WINDOWS, "0", "LLMPRESS_TEST_WINDOWS must be a positive integer, got '0'"),
        (shrink.ENV_WINDOWS, "abc", "LLMPRESS_TEST_WINDOWS must be a positive integer"),
        (shrink.ENV_SEQLEN, "-3", "LLMPRESS_TEST_SEQLEN must be a positive integer"),
        (shrink.ENV_MODELS, "smollm2-135m", "must read alias=folder"),
        (shrink.ENV_MODELS, "llama-7b=/tmp", "names llama-7b, not packaged aliases"),
        (shrink.ENV_MODELS, "smollm2-135m=/nonexistent/folder", "is not a model folder with config.json"),
    ],
)
def test_malformed_values_are_user_errors(clean_env, name, value, match):
    clean_env.setenv(name, value)
    with pytest.raises(UserError, match=match):
        if name == shrink.ENV_MODELS:
            models.resolve("smollm2-135m")
        elif name == shrink.ENV_WINDOWS:
            shrink.cap_windows(8)
        else:
            shrink.cap_seqlen(8)
