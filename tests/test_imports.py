"""The package's imports point down its floors and form no circle.

The floors are the ```floors block of docs/DEVELOPING.md (read here, so the document and
the check cannot drift apart). The import graph is read with ``ast`` from every file under
src/llmpress:

- ``import x`` and ``from x import y`` (absolute or relative, at any depth: imports inside
  functions count too, since they couple the modules as much as top-level ones, and the
  registry's old ``from . import methods`` inside a function made the 15-module circle);
- ``from pkg import name`` counts as importing ``pkg.name`` when that is a module;
- importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so those count too
  (except the importer's own ancestors, which Python has imported already).

Not seen: ``importlib.import_module`` (the registry's discovery of method modules, the one
deliberate upward reference) and imports of other distributions (torch, transformers).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = "llmpress"
DOC = ROOT / "docs" / "DEVELOPING.md"
METHODS_FLOOR = "methods"


# ----------------------------------------------------------------------------- reading the package
def package_modules(src: Path = SRC, pkg: str = PKG) -> dict[str, Path]:
    out = {}
    for f in sorted((src / pkg).rglob("*.py")):
        parts = f.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _targets(importer: str, is_pkg: bool, node: ast.AST, modules: dict) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = importer.split(".") if is_pkg else importer.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
        else:
            base = []
        stem = ".".join(base + ([node.module] if node.module else []))
        names = [stem] + [f"{stem}.{a.name}" for a in node.names]
    out = set()
    for n in names:
        while n and n not in modules:  # `from pkg import func` -> pkg
            n = n.rpartition(".")[0]
        while n:  # the module and the packages above it
            out.add(n)
            n = n.rpartition(".")[0]
    return {t for t in out if t != importer and not importer.startswith(t + ".")}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for mod, f in modules.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(mod, f.name == "__init__.py", node, modules)
        graph[mod] = edges
    return graph


def registering_modules(modules: dict[str, Path]) -> set[str]:
    """Modules with a top-level function decorated ``@register(...)`` (a method's handler)."""
    out = set()
    for mod, f in modules.items():
        for node in ast.parse(f.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register" for d in node.decorator_list
            ):
                out.add(mod)
    return out


# ----------------------------------------------------------------------------- the rules
def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def floor_violations(graph: dict[str, set[str]], floor_of: dict[str, int], closed: set[int]) -> list[str]:
    """Imports that go up a floor, or sideways on a floor in ``closed`` (methods import no other method)."""
    bad = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            if a not in floor_of or b not in floor_of:  # reported by test_every_module_has_one_floor
                continue
            if floor_of[b] > floor_of[a]:
                bad.append(f"{a} (floor {floor_of[a]}) imports {b} (floor {floor_of[b]}), a higher floor")
            elif floor_of[b] == floor_of[a] and floor_of[a] in closed:
                bad.append(f"{a} imports {b}: both on floor {floor_of[a]}, whose modules may not import each other")
    return bad


# ----------------------------------------------------------------------------- the floors, from the document
def read_floors(text: str) -> list[tuple[int, str, list[str]]]:
    """``floor N name: mod mod ...`` lines (indented lines continue the one above) of the
    first ```floors block; module names are relative to the package (``.`` is the package)."""
    m = re.search(r"^```floors\n(.*?)^```", text, re.M | re.S)
    assert m, f"{DOC} has no ```floors block"
    floors: list[tuple[int, str, list[str]]] = []
    for line in m.group(1).splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            floors[-1][2].extend(re.sub(r"\(.*?\)", "", line).split())
            continue
        h = re.match(r"floor (\d+) ([\w-]+):(.*)$", line)
        assert h, f"bad floors line: {line!r}"
        floors.append((int(h.group(1)), h.group(2), re.sub(r"\(.*?\)", "", h.group(3)).split()))
    return floors


def assign_floors(floors, modules: set[str], methods: set[str]) -> tuple[dict[str, int], list[str]]:
    floor_of, problems = {}, []
    methods_floor = [n for n, name, _ in floors if name == METHODS_FLOOR]
    assert len(methods_floor) == 1, "the floors block needs one 'methods' floor"
    for m in methods:
        floor_of[m] = methods_floor[0]
    for n, name, mods in floors:
        for short in mods:
            full = PKG if short == "." else f"{PKG}.{short}"
            if short.endswith(".*"):
                hits = [m for m in modules if m == full[:-2] or m.startswith(full[:-1])]  # the package and all below it
            else:
                hits = [full] if full in modules else []
            if not hits:
                problems.append(f"floor {n} {name}: {short} is not a module of {PKG}")
            for h in hits:
                if h in floor_of and floor_of[h] != n:
                    problems.append(f"{h} is on floors {floor_of[h]} and {n}")
                floor_of.setdefault(h, n)
    problems += [f"{m} is on no floor: add it to the ```floors block of docs/DEVELOPING.md" for m in sorted(modules - set(floor_of))]
    return floor_of, problems


# ----------------------------------------------------------------------------- tests on the package
@pytest.fixture(scope="module")
def package():
    modules = package_modules()
    graph = import_graph(modules)
    methods = registering_modules(modules)
    floors = read_floors(DOC.read_text(encoding="utf-8"))
    floor_of, problems = assign_floors(floors, set(modules), methods)
    closed = {n for n, name, _ in floors if name == METHODS_FLOOR}
    return {"graph": graph, "methods": methods, "floor_of": floor_of, "problems": problems, "closed": closed}


def test_no_import_circle(package):
    assert circles(package["graph"]) == []


def test_every_module_has_one_floor(package):
    assert package["problems"] == []


def test_imports_point_down_the_floors(package):
    assert floor_violations(package["graph"], package["floor_of"], package["closed"]) == []


def test_the_registry_finds_the_methods_this_test_sees():
    from llmpress.registry import method_index

    assert set(method_index().values()) == registering_modules(package_modules())


def test_the_graph_sees_relative_absolute_and_function_level_imports(package):
    g = package["graph"]
    assert "llmpress.quant.sweep" in g["llmpress.prune.sparsegpt"]  # from ..quant.sweep import ...
    assert "llmpress.quant" in g["llmpress.prune.sparsegpt"]  # ... runs llmpress/quant/__init__.py
    assert "llmpress.runtime.qlinear" in g["llmpress.export.packed_load"]  # inside a function
    assert "llmpress.api" in g["llmpress.bench"]
    assert "llmpress.registry" not in g["llmpress.quant.args"]


# ----------------------------------------------------------------------------- the checks can fail
def test_a_synthetic_circle_is_found():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert circles(g) == [["a", "b", "c"]]
    assert circles({"x": {"y"}, "y": set()}) == []


def test_upward_and_sideways_imports_are_found():
    g = {"leaf": set(), "gptq": {"leaf", "rtn"}, "rtn": {"leaf"}, "api": {"gptq"}, "core": {"api"}}
    floor_of = {"leaf": 0, "gptq": 1, "rtn": 1, "api": 2, "core": 0}
    bad = floor_violations(g, floor_of, closed={1})
    assert bad == [
        "core (floor 0) imports api (floor 2), a higher floor",
        "gptq imports rtn: both on floor 1, whose modules may not import each other",
    ]


def test_the_graph_reads_a_synthetic_package(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .low import f\n")
    (pkg / "sub" / "low.py").write_text("def f():\n    from ..top import g\n    return g\n")
    (pkg / "top.py").write_text("import toy.sub.low\n\ndef g():\n    pass\n")
    mods = package_modules(tmp_path, "toy")
    g = import_graph(mods)
    assert g["toy.sub.low"] == {"toy.top"} and g["toy.top"] == {"toy.sub", "toy.sub.low"}
    assert circles(g) == [["toy.sub", "toy.sub.low", "toy.top"]]  # top imports sub, whose __init__ imports low
    floors = read_floors("```floors\nfloor 0 base: sub sub.low\n  (comment) x\nfloor 1 methods: (found)\nfloor 2 app: top\n```\n")
    assert floors == [(0, "base", ["sub", "sub.low", "x"]), (1, "methods", []), (2, "app", ["top"])]
