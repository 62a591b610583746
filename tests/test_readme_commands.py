"""The README is executable: every documented `llmpress ...` command runs as written.

Every line starting with ``llmpress `` (after an optional ``$ `` prompt; ``\\``
continuations joined, trailing ``# comments`` dropped by ``shlex``) inside a fenced code
block of README.md and docs/*.md is run as a subprocess of the installed ``llmpress``
entry point, in document order, in one temporary working folder, with default flags
(progress bars on). Only the environment differs from a user's shell: the test shrink
of ``llmpress/shrink.py`` points the packaged aliases at tiny random models and caps
windows. Files a command reads that the user would bring (``./my-hf-folder``,
``my-recipe.yaml``, ``my.jsonl``) come from PLACEHOLDERS; outputs of earlier commands
(``runs/w4``) must exist by the time a later command reads them. A command whose
subcommand has no check in CHECKS, or that reads a file nobody makes, fails the test:
a new documented command needs a check here. A command documented as refused ends
with a ``# exit N`` comment (bad input: ``# exit 2``); it must exit N with a one-line
``llmpress: error: ...`` and no traceback. The README's ```python blocks run as written
in a subprocess with the same environment.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import SHRINK_WINDOWS, save_tiny_model, shrink_env

from llmpress.cli import build_parser
from llmpress.data import PACKAGED as DATA_PACKAGED
from llmpress.eval.tasks import INSTALL_HINT as TASKS_HINT
from llmpress.eval.tasks import parse_tasks
from llmpress.models import PACKAGED
from llmpress.recipe import presets

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
LLMPRESS = Path(sys.executable).with_name("llmpress")
TIMEOUT_S = 600
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
REFUSAL = re.compile(r"^llmpress( \w+)?: error: \S")  # ours, or argparse's "llmpress compress: error: ..."
EXIT_NOTE = re.compile(r"#\s*exit(?:s| code)?\s+(\d+)\b")
HAVE_HARNESS = importlib.util.find_spec("lm_eval") is not None  # the optional `tasks` extra (`make install` installs it)


@dataclass(kw_only=True, frozen=True)
class DocCommand:
    where: str  # file:line of the command's first line
    text: str  # as written (continuations joined)
    argv: tuple[str, ...]
    exit_code: int = 0  # a trailing `# exit N` comment documents a refusal (bad input: N = 2)


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the first content line, lines) of each fenced code block."""
    blocks, fence, lang, start, body = [], None, "", 0, []
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang, start, body = m.group(1), m.group(2).lower(), n + 1, []
        elif fence is not None and m and m.group(1).startswith(fence[0]) and len(m.group(1)) >= len(fence) and not m.group(2):
            blocks.append((lang, start, body))
            fence = None
        elif fence is not None:
            body.append(line)
    return blocks


def commands_in(text: str, name: str) -> list[DocCommand]:
    """The ``llmpress ...`` command lines of the fenced blocks of one markdown text."""
    out = []
    for _lang, start, body in fenced_blocks(text):
        i = 0
        while i < len(body):
            first, line = i, body[i].strip()
            while line.endswith("\\") and i + 1 < len(body):  # shell continuation
                i += 1
                line = line[:-1].rstrip() + " " + body[i].strip()
            i += 1
            if line.startswith("$ "):
                line = line[2:].lstrip()
            if line.startswith("llmpress "):
                argv = tuple(shlex.split(line, comments=True))
                comment = " ".join(shlex.split(line)[len(argv) :])
                m = EXIT_NOTE.match(comment)
                out.append(DocCommand(where=f"{name}:{start + first}", text=line, argv=argv, exit_code=int(m.group(1)) if m else 0))
    return out


def doc_commands() -> list[DocCommand]:
    return [c for p in DOCS for c in commands_in(p.read_text(), p.relative_to(ROOT).as_posix())]


def readme_blocks(lang: str, doc: str = "README.md") -> list[str]:
    return ["\n".join(body) + "\n" for b_lang, _, body in fenced_blocks((ROOT / doc).read_text()) if b_lang == lang]


# --- files users bring, keyed exactly as the docs write them --------------------------------


def _hf_folder(path: Path) -> None:
    save_tiny_model(path, "llama")


def _readme_recipe(path: Path) -> None:
    (yaml_block,) = readme_blocks("yaml")  # the recipe the README shows is the one it runs
    path.write_text(yaml_block)


def _jsonl(path: Path) -> None:
    from conftest import TINY_TEXT

    path.write_text("".join(json.dumps({"text": TINY_TEXT[i:] + TINY_TEXT}) + "\n" for i in range(0, 400, 40)))


def _task_file(path: Path) -> None:
    """The task file and its documents as docs/tasks.md shows them (the data file is named in the YAML)."""
    (yaml_block,) = readme_blocks("yaml", "docs/tasks.md")
    (jsonl_block,) = readme_blocks("jsonl", "docs/tasks.md")
    path.write_text(yaml_block)
    (path.parent / "my-task.jsonl").write_text(jsonl_block)


PLACEHOLDERS = {"./my-hf-folder": _hf_folder, "my-recipe.yaml": _readme_recipe, "my.jsonl": _jsonl, "my-task.yaml": _task_file}


def _sources(value: str) -> list[tuple[str, str]]:
    """("data", source) of each item of a --calib-data / --eval-data list (``:share`` suffixes dropped;
    not validated: a documented refusal may hold a malformed list)."""
    return [("data", re.sub(r":[^:/]*$", "", item.strip())) for item in value.split(",") if item.strip()]


def _inputs(args) -> list[tuple[str, str]]:
    """(kind, value) of every file or model a parsed command reads."""
    cmd = args.command
    tasks = [("task", t) for t in parse_tasks(getattr(args, "tasks", None) or "") if t.endswith((".yaml", ".yml"))]  # task files
    if cmd == "compress":
        return [("model", args.model), ("recipe", args.recipe), *_sources(args.calib_data or "wiki"), *_sources(args.eval_data), *tasks]
    if cmd == "eval":
        return [("model", args.model), *_sources(args.eval_data), *tasks]
    if cmd == "export":
        return [("model", args.checkpoint)]
    if cmd == "bench":
        return [("model", m.rsplit("@", 1)[0]) for m in args.models] + ([("model", args.baseline)] if args.baseline else [])
    if cmd == "analyze":
        return [("model", args.model), ("data", args.data)]
    if cmd == "plan-bits":
        return [("model", args.model), ("recipe", args.base), *_sources(args.calib_data)]
    return []


def _expected_exit(c: DocCommand, args) -> int:
    """The documented exit code; where lm-evaluation-harness (the `tasks` extra) is not installed, a
    command with --tasks must refuse (exit 2) naming the extra."""
    return 2 if args is not None and getattr(args, "tasks", None) and not HAVE_HARNESS else c.exit_code


def _builtin(kind: str, value: str) -> bool:
    return (kind == "model" and value in PACKAGED) or (kind == "recipe" and value in presets()) or (kind == "data" and value in DATA_PACKAGED)


def provide_inputs(args, cwd: Path) -> list[str]:
    """Create the placeholder files the command reads; return the inputs nobody provides."""
    missing = []
    for kind, value in _inputs(args):
        if _builtin(kind, value) or (cwd / value).exists():
            continue
        if value in PLACEHOLDERS:
            PLACEHOLDERS[value](cwd / value)
        else:
            missing.append(f"{kind} {value!r}")
    return missing


# --- what each subcommand must have done -------------------------------------------------------


def _finite_ppl(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 1


def check_tasks(args, figures: list[dict], stdout: str) -> None:
    """--tasks: every task scored in each of ``figures`` (baseline and compressed, or the one model), on
    the documents the shrink allows, its accuracy and, where the task has one, perplexity in the table."""
    if not args.tasks:
        return
    cap = SHRINK_WINDOWS  # doc_env's window cap, which caps the documents per task too
    n_items = len(parse_tasks(args.tasks))
    for fig in figures:
        assert len(fig["tasks"]) == n_items, fig["tasks"]
        for name, row in fig["tasks"].items():
            assert 0 <= row["acc"] <= 1 and 1 <= row["samples"] <= min(cap, args.tasks_limit or cap), (name, row)
            assert f"{name} acc ({row['samples']} docs)" in stdout, stdout
            assert "perplexity" not in row or row["perplexity"] >= 1, (name, row)


def check_recipes(args, res, cwd: Path) -> None:
    listed = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert listed == set(presets()), sorted(listed ^ set(presets()))


def check_compress(args, res, cwd: Path) -> None:
    from llmpress import load_compressed
    from llmpress.export.packed import check_packed
    from llmpress.export.packed_load import read_manifest

    assert "perplexity" in res.stdout and "TEST SHRINK in force" in res.stdout, res.stdout
    if args.json_path:
        rep = json.loads((cwd / args.json_path).read_text())
        assert set(rep["test_shrink"]) == {"LLMPRESS_TEST_MODELS", "LLMPRESS_TEST_WINDOWS", "LLMPRESS_TEST_SEQLEN"}
        assert rep["model"] == args.model
        if not args.no_eval:
            assert _finite_ppl(rep["baseline"]["ppl"]) and _finite_ppl(rep["compressed"]["ppl"]), (rep["baseline"], rep["compressed"])
            assert rep["evaluation"]["windows"] == int(rep["test_shrink"]["LLMPRESS_TEST_WINDOWS"])
            sources = [s for _, s in _sources(args.eval_data)]
            for fig in (rep["baseline"], rep["compressed"]):  # one perplexity per --eval-data source, the first one's is ppl
                assert list(fig["ppl_by_source"]) == sources and all(map(_finite_ppl, fig["ppl_by_source"].values()))
                assert fig["ppl"] == fig["ppl_by_source"][sources[0]]
            if len(sources) > 1:
                assert all(f"perplexity ({s})" in res.stdout for s in sources), res.stdout
            if args.kl_windows:  # KL divergence and top-1 agreement per source (llmpress/eval/kl.py)
                assert list(rep["compressed"]["kl_by_source"]) == sources and "KL divergence" in res.stdout, res.stdout
        assert 0 < rep["bits_per_weight"] < 16 and rep["peak_rss_mb"] > 0 and rep["seconds"]["compress_total"] >= 0
        check_tasks(args, [rep["baseline"], rep["compressed"]], res.stdout)
    if args.out:
        assert f"saved: {args.out}" in res.stdout
        if args.save_format == "packed":
            # a streamed compress writes its tensors in several files (v3)
            assert check_packed(cwd / args.out, read_manifest(cwd / args.out)) in ((3,) if args.stream else (1, 2))
        model, tok = load_compressed(str(cwd / args.out))
        ids = torch.tensor([tok("Quantization maps real numbers to integers.")["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def check_eval_kv(args, res, cwd: Path) -> None:
    rows = json.loads(res.stdout[res.stdout.index("[") :])
    assert len(rows) == len(args.kv) and all(_finite_ppl(r["ppl"]) and r["cache_bytes_peak"] > 0 for r in rows), rows
    assert not args.passkey or all(isinstance(r["passkey"]["correct"], bool) for r in rows), rows
    if args.json_path:
        assert json.loads((cwd / args.json_path).read_text())["test_shrink"]


def check_eval(args, res, cwd: Path) -> None:
    if args.kv:
        return check_eval_kv(args, res, cwd)
    out = json.loads(res.stdout[res.stdout.index("{") :])  # after the task rows, with --tasks
    assert _finite_ppl(out["ppl"]) and 0 < out["bits_per_weight"] <= 32 and out["n_params"] > 0, out
    check_tasks(args, [out], res.stdout)
    sources = [s for _, s in _sources(args.eval_data)]
    assert list(out["ppl_by_source"]) == sources and out["ppl"] == out["ppl_by_source"][sources[0]], out
    if args.baseline and args.kl_windows:
        assert list(out["kl_by_source"]) == sources and 0 <= out["top1"] <= 1, out
    if args.json_path:
        assert json.loads((cwd / args.json_path).read_text())["test_shrink"]


def check_export(args, res, cwd: Path) -> None:
    out = cwd / args.out
    assert f"as {args.export_format}: {args.out}" in res.stdout, res.stdout
    if args.export_format == "gguf":
        import gguf

        r = gguf.GGUFReader(out)
        assert r.fields["general.architecture"].contents() == "llama"
        assert any(t.tensor_type.name in ("Q4_0", "Q8_0", "Q4_1") for t in r.tensors), [t.tensor_type.name for t in r.tensors]
    else:
        assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"


def check_plan_bits(args, res, cwd: Path) -> None:
    from llmpress.recipe import Recipe

    recipe = Recipe.from_yaml((cwd / args.out).read_text())  # a recipe `compress --recipe` reads
    assert recipe.name.endswith(f"-mixed{args.budget:g}") and f"recipe: {args.out}" in res.stdout, res.stdout
    bpw = float(next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("mixed ")))
    assert bpw <= args.budget


CHECKS = {"recipes": check_recipes, "compress": check_compress, "eval": check_eval, "export": check_export, "plan-bits": check_plan_bits}


# --- the tests -------------------------------------------------------------------------------------


def test_collector_reads_prompts_comments_and_continuations():
    md = "\n".join(
        [
            "text llmpress outside a fence",
            "```",
            "$ llmpress eval runs/a   # a comment",
            "llmpress compress m \\",
            "    --recipe 'r x' --out o",
            "make demo",
            "llmpress compress m --recipe r --calib-samples 0   # exit 2: refused",
            "```",
            "  ~~~sh",
            "llmpress recipes",
            "  ~~~",
            "```python",
            "import llmpress",
            "```",
        ]
    )
    cmds = commands_in(md, "x.md")
    assert [c.argv for c in cmds] == [
        ("llmpress", "eval", "runs/a"),
        ("llmpress", "compress", "m", "--recipe", "r x", "--out", "o"),
        ("llmpress", "compress", "m", "--recipe", "r", "--calib-samples", "0"),
        ("llmpress", "recipes"),
    ]
    assert [c.where for c in cmds] == ["x.md:3", "x.md:4", "x.md:7", "x.md:10"]
    assert [c.exit_code for c in cmds] == [0, 0, 2, 0]
    assert [lang for lang, _, _ in fenced_blocks(md)] == ["", "sh", "python"]


def test_docs_have_commands_and_each_has_a_check():
    cmds = doc_commands()
    assert cmds, "no `llmpress ...` line found in the fenced blocks of README.md and docs/*.md"
    parser = build_parser()
    for c in cmds:
        if c.exit_code == 0:
            args = parser.parse_args(list(c.argv[1:]))
            assert args.command in CHECKS, f"{c.where}: `{c.text}` has no check in CHECKS"


@pytest.fixture
def doc_env(tiny_alias_folders):
    # one thread: tiny matrices gain nothing from more, and on a shared runner OpenMP spinning
    # multiplied this test's time by 4 (measured); the code path is the same
    return {**os.environ, **shrink_env(tiny_alias_folders), "OMP_NUM_THREADS": "1"}


def run_documented(c: DocCommand, parser, cwd: Path, env: dict) -> str | None:
    """Run one documented command; None when it did what the docs say, else why not."""
    try:
        args = parser.parse_args(list(c.argv[1:]))
    except SystemExit:  # argparse refused it (and printed why)
        args = None
        if c.exit_code != 2:
            return f"{c.where}: `{c.text}` does not parse"
    if args is not None and c.exit_code == 0 and args.command not in CHECKS:
        return f"{c.where}: `{c.text}` cannot run: no check for `{args.command}` in CHECKS"
    missing = provide_inputs(args, cwd) if args is not None else []
    if missing and c.exit_code == 0:
        return f"{c.where}: `{c.text}` reads {', '.join(missing)}: add it to PLACEHOLDERS"
    expected = _expected_exit(c, args)
    res = subprocess.run([str(LLMPRESS), *c.argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if res.returncode != expected or "Traceback" in res.stderr:
        return f"{c.where}: `{c.text}` exit {res.returncode}, documented {expected}:\n{res.stderr[-3000:]}"
    if expected:  # a documented refusal: one line saying what is wrong
        last = (res.stderr.strip().splitlines() or [""])[-1]
        if expected != c.exit_code and not last.endswith(TASKS_HINT):
            return f"{c.where}: `{c.text}` without lm-evaluation-harness must name {TASKS_HINT!r}; stderr ends {last!r}"
        return None if REFUSAL.match(last) else f"{c.where}: `{c.text}` exit {res.returncode}, but stderr ends {last!r}"
    try:
        CHECKS[args.command](args, res, cwd)
    except AssertionError as e:
        return f"{c.where}: `{c.text}` ran, but: {e!r}\nstdout: {res.stdout[-2000:]}"
    return None


def test_every_documented_command_runs_as_written(tmp_path, doc_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    failures = [f for c in doc_commands() if (f := run_documented(c, parser, tmp_path, doc_env))]
    assert not failures, "\n\n".join(failures)


def test_readme_python_snippet_runs_as_written(tmp_path, doc_env):
    (code,) = readme_blocks("python")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=doc_env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    bits, size_mb = (float(x) for x in res.stdout.split())
    assert bits == 4.25  # RTN W4 g64: 4 bits + one 16-bit scale per 64 weights
    assert 0 < size_mb < 1  # the tiny stand-in, about 0.07 MB under the size convention
    layers = json.loads((tmp_path / "smollm2-w4" / "llmpress.json").read_text())["layers"]
    assert layers and {d["kind"] for d in layers.values()} == {"quant"}  # saved packed, as compressed


def test_a_documented_refusal_must_refuse(tmp_path, doc_env):
    parser = build_parser()
    (refused, wrong) = commands_in(
        "```\nllmpress compress smollm2-135m --recipe no-such-preset   # exit 2\nllmpress recipes   # exit 2\n```\n", "x.md"
    )
    assert run_documented(refused, parser, tmp_path, doc_env) is None
    assert "exit 0, documented 2" in run_documented(wrong, parser, tmp_path, doc_env)


def makefile_commands(target: str) -> list[DocCommand]:
    """The ``$(BIN)/llmpress ...`` lines of a Makefile target's recipe (what `make TARGET` runs after installing)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", ln))
    out = []
    for n in range(start + 1, len(lines)):
        if not lines[n].startswith("\t"):
            break
        line = lines[n].strip()
        if line.startswith("$(BIN)/llmpress "):
            line = line.removeprefix("$(BIN)/")
            out.append(DocCommand(where=f"Makefile:{n + 1}", text=line, argv=tuple(shlex.split(line, comments=True))))
    return out


def test_make_demo_runs_as_written(tmp_path, doc_env, monkeypatch):
    """The README's first command, `make demo`: its llmpress line, default flags, on the tiny stand-in."""
    assert "make demo" in (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    (demo,) = makefile_commands("demo")
    assert demo.argv[:2] == ("llmpress", "compress")
    monkeypatch.chdir(tmp_path)
    assert run_documented(demo, build_parser(), tmp_path, doc_env) is None
