"""The test tree keeps the layout docs/DEVELOPING.md ("Test layout") describes: folders mirror
src/llmpress's packages, file names are unique, and the shared helpers are not copied back."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src" / "llmpress"
SHARED = {"fixtures"}  # not a package's tests: data the tests read
SCRIPTS = {"benchmarks"}  # tests of the repository's scripts outside the package (benchmarks/*.py)


def _test_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if "fixtures" not in p.parts)


def test_each_test_folder_is_a_package_of_src():
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))} - SHARED - SCRIPTS
    assert all((TESTS.parent / s).is_dir() for s in SCRIPTS)
    packages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert folders <= packages, sorted(folders - packages)
    assert {"quant", "prune", "transform", "calib", "export", "runtime", "storage", "eval", "analysis"} <= folders
    assert not list(TESTS.rglob("__init__.py"))  # rootdir conftest imports rely on pytest's default mode


def test_test_file_names_are_unique():
    names = Counter(p.name for p in _test_files())
    assert [n for n, c in names.items() if c > 1] == []


def test_shared_helpers_are_not_redefined():
    shared = {n.name for n in ast.parse((TESTS / "helpers.py").read_text()).body if isinstance(n, ast.FunctionDef)}
    shared |= {"_rel", "_logits"}  # the names the copies had
    copies = []
    for p in _test_files():
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name in shared:
                copies.append(f"{p.relative_to(TESTS)}: {node.name}")
    assert copies == []
