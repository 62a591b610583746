"""Downstream tasks through lm-evaluation-harness (llmpress/eval/tasks.py, eval/task_files.py).

The shipped last-word tasks are built from the packaged text; the harness scores the tiny
random model in memory and its figures must equal a direct computation with the model,
done here the way the harness's HF adapter defines them (the continuation's tokens are those
the whole text has beyond the context's; a greedy match is every continuation token being
the argmax). The harness is an optional extra (``llmpress[tasks]``, installed by
``make install``): the tests that run it are skipped, with the reason, where it is absent.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import TINY_TEXT, save_tiny_model, tiny_llama, tiny_tokenizer

from llmpress.cli import main
from llmpress.errors import UserError
from llmpress.eval.task_files import CONTEXT_WORDS, LASTWORD_TASKS, MAX_DOCS, MIN_CONTEXT_WORDS, lastword_docs, lastword_item
from llmpress.eval.tasks import INSTALL_HINT, TaskConfig, parse_tasks, run_tasks, summarize

try:
    import lm_eval  # noqa: F401

    HAVE_HARNESS = True
except ImportError:
    HAVE_HARNESS = False
needs_harness = pytest.mark.skipif(not HAVE_HARNESS, reason=f"lm-evaluation-harness is not installed ({INSTALL_HINT}; `make install` installs it)")


# --- the shipped task's documents -------------------------------------------------------------


def test_lastword_item_cuts_at_a_sentence_start_and_drops_the_full_stop():
    first = " ".join(f"w{i}" for i in range(CONTEXT_WORDS - 10)) + "."
    second = "The model reads every word of this passage and then predicts the final " + " ".join(["word"] * 10) + " carefully."
    item = lastword_item(f"{first} {second}")
    assert item == {"context": second.removesuffix(" carefully."), "target": "carefully"}  # the first sentence would pass 80 words
    short = "Too short a paragraph ends here."
    assert lastword_item(short) is None  # fewer than MIN_CONTEXT_WORDS words before the target
    long_one = " ".join(f"x{i}" for i in range(200)) + " ending."
    item = lastword_item(long_one)
    assert item["target"] == "ending" and item["context"].split() == [f"x{i}" for i in range(200 - CONTEXT_WORDS, 200)]
    base = " ".join(["word"] * (MIN_CONTEXT_WORDS + 1))
    for bad_end in ("in 1999.", "of it", "by UN2.", "at it."):  # a number, no full stop, not letters, under 3 letters
        assert lastword_item(f"{base} {bad_end}") is None, bad_end
    assert lastword_item(f"{base} ends.") == {"context": base, "target": "ends"}


def test_lastword_docs_come_from_the_test_split_deterministically():
    from llmpress.data import documents

    docs = lastword_docs("news")
    assert docs == lastword_docs("news") and 30 <= len(docs) <= MAX_DOCS
    test_text = " ".join(" ".join(d.split()) for d in documents("news", "test"))
    calib_text = " ".join(" ".join(d.split()) for d in documents("news", "calib"))
    for d in docs:
        assert MIN_CONTEXT_WORDS <= len(d["context"].split()) <= CONTEXT_WORDS and d["target"].isalpha()
        passage = f"{d['context']} {d['target']}."
        assert passage in test_text and passage not in calib_text, passage
    wiki = lastword_docs("wiki")
    assert len(wiki) == MAX_DOCS and wiki == lastword_docs("wiki", MAX_DOCS)
    assert lastword_docs("wiki", 10) == [lastword_docs("wiki", 10_000)[i * len(lastword_docs("wiki", 10_000)) // 10] for i in range(10)]


def test_task_settings_are_checked():
    assert parse_tasks(" a.yaml, llmpress_wiki_lastword ,a.yaml,") == ("a.yaml", "llmpress_wiki_lastword")
    for bad in ({"names": ()}, {"names": ("x", " ")}, {"names": ("x",), "limit": 0}, {"names": ("x",), "batch_size": 0}):
        with pytest.raises(UserError):
            TaskConfig(**bad)


def test_summarize_reads_lm_eval_results():
    res = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "perplexity,none": 3.0, "perplexity_stderr,none": "N/A", "exact_match,strict": 1.0}
    out = {"results": {"t": res}, "n-samples": {"t": {"original": 10, "effective": 4}}}
    want = {"acc": 0.5, "acc_stderr": 0.1, "perplexity": 3.0, "perplexity_stderr": None, "exact_match,strict": 1.0, "samples": 4}
    assert summarize(out) == {"t": want}


# --- the harness against a direct computation -----------------------------------------------------


def direct_loglikelihood(model, tok, context: str, continuation: str, max_length: int) -> tuple[float, bool]:
    """(log-likelihood of ``continuation`` after ``context``, whether it is the greedy continuation)."""
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx) :]
    inp = (ctx + cont)[-(max_length + 1) :][:-1]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([inp])).logits[0, -len(cont) :].float().log_softmax(-1)
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


@needs_harness
def test_shipped_task_scores_equal_a_direct_computation(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    name = "llmpress_news_lastword"
    got = run_tasks(model, tok, TaskConfig(names=(name,)))[name]
    docs = lastword_docs(LASTWORD_TASKS[name])
    scored = [direct_loglikelihood(model, tok, d["context"], " " + d["target"], model.config.max_position_embeddings) for d in docs]
    assert got["samples"] == len(docs)
    assert got["acc"] == sum(g for _, g in scored) / len(docs)
    assert got["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in scored) / len(docs)), rel=1e-4)
    assert got["acc_stderr"] is not None and got["perplexity_stderr"] > 0
    first = run_tasks(model, tok, TaskConfig(names=(name,), limit=5))[name]  # the first five documents
    assert first["samples"] == 5
    assert first["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in scored[:5]) / 5), rel=1e-4)


def write_choice_task(folder, model, tok, n: int = 24):
    """A multiple-choice task file of the user's kind (local JSONL), whose gold answer is the
    model's own best choice for every third document and another choice otherwise: the harness
    must find accuracy 1/3, which a direct computation confirms."""
    words = TINY_TEXT.split()
    choices = ["bits", "dog", "weights"]
    docs = []
    for i in range(n):
        context = " ".join(words[i * 3 : i * 3 + 12])
        lls = [direct_loglikelihood(model, tok, context, " " + c, 256)[0] for c in choices]
        best = max(range(3), key=lls.__getitem__)
        docs.append({"context": context, "choices": choices, "gold": best if i % 3 == 0 else (best + 1) % 3})
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {
        "task": "my_choice",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "docs.jsonl")}, "cache_dir": str(folder / "cache")},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    path = folder / "my_choice.yaml"
    path.write_text(json.dumps(spec))
    return path, docs


@needs_harness
def test_user_task_file_multiple_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    path, docs = write_choice_task(tmp_path, model, tok)
    got = run_tasks(model, tok, TaskConfig(names=(str(path),)))
    assert got["my_choice"]["samples"] == len(docs)
    assert got["my_choice"]["acc"] == pytest.approx(1 / 3)


# --- the command line --------------------------------------------------------------------------------


@needs_harness
def test_compress_and_eval_report_the_task_scores(tmp_path, capsys, restore_logging, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model_dir = save_tiny_model(tmp_path / "tiny")
    out, js = tmp_path / "w4", tmp_path / "w4.json"
    common = "--tasks llmpress_wiki_lastword,llmpress_news_lastword --tasks-limit 6 --eval-windows 2 --seqlen 32 --no-progress".split()
    assert main(["compress", str(model_dir), "--recipe", "rtn-w4g64", "--calib-samples", "2", "--out", str(out), "--json", str(js), *common]) == 0
    table = capsys.readouterr().out
    rep = json.loads(js.read_text())
    for fig in (rep["baseline"], rep["compressed"]):
        assert set(fig["tasks"]) == set(LASTWORD_TASKS)
        for row in fig["tasks"].values():
            assert row["samples"] == 6 and 0 <= row["acc"] <= 1 and row["perplexity"] > 1
    assert rep["evaluation"]["tasks"]["names"] == list(LASTWORD_TASKS) and rep["evaluation"]["tasks"]["limit"] == 6
    assert rep["seconds"]["baseline_tasks"] > 0 and rep["seconds"]["compressed_tasks"] > 0
    assert "llmpress_wiki_lastword acc (6 docs)" in table and "llmpress_news_lastword perplexity (6 docs)" in table
    # the saved checkpoint, evaluated: the same compressed model, the same scores
    assert main(["eval", str(out), "--json", str(tmp_path / "e.json"), *common]) == 0
    printed = capsys.readouterr().out
    shown = json.loads(printed[printed.index("{") :])
    assert shown["tasks"] == json.loads((tmp_path / "e.json").read_text())["compressed"]["tasks"]
    for name, row in shown["tasks"].items():
        assert row["acc"] == rep["compressed"]["tasks"][name]["acc"]
        assert row["perplexity"] == pytest.approx(rep["compressed"]["tasks"][name]["perplexity"], rel=1e-4)
    assert "llmpress_news_lastword acc (6 docs)" in printed.split("{")[0]


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmpress: error: ") and "Traceback" not in err[0], err
    return err[0]


@needs_harness
def test_bad_tasks_are_refused_before_anything_is_written(tmp_path, capsys, restore_logging, private_cache):
    model_dir = save_tiny_model(tmp_path / "tiny")
    out, js = tmp_path / "outs" / "w4", tmp_path / "outs" / "w4.json"
    run = ["compress", str(model_dir), "--recipe", "rtn-w4g64", "--out", str(out), "--json", str(js), "--no-progress", "--tasks"]
    assert "unknown task 'no_such_task'" in _refused([*run, "llmpress_wiki_lastword,no_such_task"], capsys)
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    assert "task file" in _refused([*run, str(tmp_path / "broken.yaml")], capsys)
    (tmp_path / "nodata.yaml").write_text(json.dumps({"task": "nodata", "dataset_path": "json", "output_type": "loglikelihood", "test_split": "test",
                                                      "dataset_kwargs": {"data_files": {"test": str(tmp_path / "missing.jsonl")}},
                                                      "doc_to_text": "{{a}}", "doc_to_target": "{{b}}"}))  # fmt: skip
    assert "missing.jsonl" in _refused([*run, str(tmp_path / "nodata.yaml")], capsys)
    (tmp_path / "docs.jsonl").write_text('{"a": "a context", "b": "word"}\n')
    wrong = {"task": "wrong", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "docs.jsonl")}}, "test_split": "test"}
    (tmp_path / "field.yaml").write_text(json.dumps({**wrong, "output_type": "loglikelihood", "doc_to_text": "{{zzz}}", "doc_to_target": "{{b}}"}))
    assert "'zzz' is undefined" in _refused([*run, str(tmp_path / "field.yaml")], capsys)
    (tmp_path / "kind.yaml").write_text(json.dumps({**wrong, "output_type": "perplexity", "doc_to_text": "{{a}}", "doc_to_target": "{{b}}"}))
    assert "invalid output_type 'perplexity'" in _refused([*run, str(tmp_path / "kind.yaml")], capsys)
    (tmp_path / "notask.yaml").write_text("dataset_path: json\n")
    assert "notask.yaml" in _refused([*run, str(tmp_path / "notask.yaml")], capsys)
    assert "not found" in _refused([*run, str(tmp_path / "absent.yaml")], capsys)
    assert not (tmp_path / "outs").exists()
    assert "--stream" in _refused(["eval", str(model_dir), "--stream", "--tasks", "llmpress_wiki_lastword"], capsys)
    assert "--kv" in _refused(["eval", str(model_dir), "--kv", "full", "--tasks", "llmpress_wiki_lastword"], capsys)


def test_tasks_without_the_harness_name_the_extra(tmp_path, capsys, restore_logging, monkeypatch):
    for name in ["lm_eval", *(m for m in sys.modules if m.startswith("lm_eval."))]:  # what an environment without the extra imports
        monkeypatch.setitem(sys.modules, name, None)
    model_dir = tmp_path / "never-loaded"
    line = _refused(["eval", str(model_dir), "--tasks", "llmpress_wiki_lastword"], capsys)
    assert line.endswith(INSTALL_HINT) and "lm-evaluation-harness" in line
    assert "--tasks-limit applies to --tasks" in _refused(["eval", str(model_dir), "--tasks-limit", "3"], capsys)
