"""The downstream tasks shipped with llmpress, written as lm-evaluation-harness task files.

``llmpress_wiki_lastword`` and ``llmpress_news_lastword`` are LAMBADA-style last-word
prediction on the packaged test text (:mod:`llmpress.data`: the Wikipedia test articles,
the Lee news test documents): each document is the end of a paragraph, at most
:data:`CONTEXT_WORDS` words cut at a sentence start, whose final sentence ends in a plain
word of three letters or more; the model reads every word before it and is scored on
that word (lm-eval's ``loglikelihood`` output: ``acc`` = the word is the greedy
continuation, ``perplexity`` = exp of the mean negative log-likelihood of the word).
Built deterministically from the text, at most :data:`MAX_DOCS` documents spread evenly
over the split; nothing is downloaded. :func:`write_task` writes one as a JSONL file and a
task YAML that reads it (``dataset_path: json``) into a folder the caller owns.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import data as data_mod

LASTWORD_TASKS = {"llmpress_wiki_lastword": "wiki", "llmpress_news_lastword": "news"}  # task name -> packaged source
MAX_DOCS = 200
CONTEXT_WORDS = 80  # words before the final one, at most
MIN_CONTEXT_WORDS = 20
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_FINAL = re.compile(r"([A-Za-z]{3,})\.")  # the passage's last word, with its full stop


def lastword_item(paragraph: str) -> dict | None:
    """``{"context", "target"}`` of one paragraph (None when it does not end in a plain word):
    the target is the final word without its full stop; the context, the words before it,
    starting at the latest sentence start that keeps it within :data:`CONTEXT_WORDS` words
    (the last sentence's own tail when that sentence alone is longer)."""
    sentences = [s.split() for s in _SENTENCE_END.split(paragraph.strip()) if s.strip()]
    if not sentences or not (m := _FINAL.fullmatch(sentences[-1][-1])):
        return None
    words = sentences[-1][:-1]
    for s in reversed(sentences[:-1]):
        if len(words) + len(s) > CONTEXT_WORDS:
            break
        words = s + words
    words = words[-CONTEXT_WORDS:]
    if len(words) < MIN_CONTEXT_WORDS:
        return None
    return {"context": " ".join(words), "target": m.group(1)}


def lastword_docs(source: str, max_docs: int = MAX_DOCS) -> list[dict]:
    """The documents of a last-word task on the test split of a packaged ``source``: every
    qualifying paragraph (:func:`lastword_item`) in text order, thinned to at most
    ``max_docs`` taken at even steps."""
    items = [it for doc in data_mod.documents(source, "test") for para in doc.split("\n") if (it := lastword_item(para))]
    if len(items) <= max_docs:
        return items
    return [items[i * len(items) // max_docs] for i in range(max_docs)]


def task_yaml(name: str, jsonl: Path, cache_dir: Path) -> str:
    """The lm-eval task file of a last-word task whose documents are in ``jsonl``."""
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}, "cache_dir": str(cache_dir)},
        "output_type": "loglikelihood",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{' ' + target}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        ],
        "metadata": {"version": 1.0, "source": f"llmpress packaged text: {LASTWORD_TASKS[name]} (test split)"},
    }
    return json.dumps(spec, indent=2) + "\n"  # JSON is YAML: no YAML writer needed


def write_task(name: str, folder: Path) -> Path:
    """Write the shipped task ``name`` into ``folder`` (the caller's temporary folder): its
    documents (``NAME.jsonl``) and its task file (``NAME.yaml``, returned)."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in lastword_docs(LASTWORD_TASKS[name])), encoding="utf-8")
    path = folder / f"{name}.yaml"
    path.write_text(task_yaml(name, jsonl, folder / "datasets-cache"), encoding="utf-8")
    return path
