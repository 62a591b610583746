"""CLI polish: help text on every flag of every subcommand, --version, the recipes listing."""

from __future__ import annotations

import argparse
from importlib.metadata import version

import pytest

from llmpress import cli
from llmpress.cli import build_parser, main, recipes_table


def _parsers(p: argparse.ArgumentParser, path: str = "llmpress"):
    """(command path, parser) for the root parser and every subcommand, recursively."""
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_flag_and_subcommand_has_help():
    missing = []
    for path, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                helped = {c.dest for c in a._choices_actions if c.help}
                missing += [f"{path} {name} (subcommand)" for name in a.choices if name not in helped]
            elif not (a.help or "").strip() or a.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, "arguments without help text: " + ", ".join(missing)


def test_the_walk_sees_every_subcommand():
    paths = {path for path, _ in _parsers(build_parser())}
    assert {"llmpress compress", "llmpress eval", "llmpress export", "llmpress bench", "llmpress recipes", "llmpress analyze"} <= paths


def test_help_renders_for_every_subcommand(capsys):
    for path, _ in _parsers(build_parser()):
        with pytest.raises(SystemExit) as e:
            main(path.split()[1:] + ["--help"])
        assert e.value.code == 0
        assert "usage: " + path in capsys.readouterr().out


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"llmpress {version('llmpress')}\n"


def test_recipes_table_aligns_long_names():
    rows = [("a", "short"), ("a-very-long-preset-name-w4a4kv4-gptq", "long one"), ("mid-name", "")]
    lines = recipes_table(rows).splitlines()
    width = len("a-very-long-preset-name-w4a4kv4-gptq") + 2
    assert lines == ["a" + " " * (width - 1) + "short", "a-very-long-preset-name-w4a4kv4-gptq  long one", "mid-name"]


def test_recipes_table_wraps_under_its_column():
    desc = "word " * 40
    lines = recipes_table([("name", desc.strip()), ("longer-name", "x")], line_width=60).splitlines()
    assert len(lines) > 2 and all(len(ln) <= 60 for ln in lines)
    assert lines[0].startswith("name         word") and all(ln.startswith(" " * 13 + "word") for ln in lines[1:-1])
    assert lines[-1] == "longer-name  x"


def test_recipes_lists_every_preset_in_aligned_columns(capsys, monkeypatch):
    from llmpress import recipe

    presets = dict(recipe.presets())
    long_name = "spinquant-w4a4kv4-gptq-with-a-much-longer-name"
    presets[long_name] = presets["rtn-w4g64"]
    monkeypatch.setattr(recipe, "presets", lambda: presets)
    monkeypatch.setattr(cli.sys.stdout, "isatty", lambda: False, raising=False)
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list(presets)
    col = len(long_name) + 2
    for ln, name in zip(lines, presets):
        assert ln[:col] == name.ljust(col) and ln[col] != " ", ln
