"""benchmarks/kvcache.py's --text: which contexts a short text allows, a clear error for a
section it is too short for, and one set of tables per test text."""

import argparse

import pytest
from bench_scripts import load_script

from llmpress.errors import UserError

kv = load_script("kvcache")


def _args(**kw):
    base = {"tokens": 16384, "prefill": 2048, "decode_tokens": 64, "text": "news"}
    return argparse.Namespace(**{**base, **kw})


def test_short_text_keeps_the_contexts_it_covers():
    assert kv.check_length(["kivi", "kv4"], 12871, _args()) == (2048, 4096, 8192)
    assert kv.check_length(["kivi"], 5000, _args()) == (2048, 4096)


def test_section_longer_than_the_text_is_refused_before_any_work():
    with pytest.raises(UserError, match=r"news: 12871 test tokens, too short for streaming needs 16384"):
        kv.check_length(["kivi", "streaming"], 12871, _args())
    with pytest.raises(UserError, match="shorter than the kivi/kv4 contexts"):
        kv.check_length(["kivi"], 1000, _args())
    # a shorter stream makes the streaming section fit
    assert kv.check_length(["streaming"], 12871, _args(tokens=8192)) == (2048, 4096, 8192)


def _kivi(text, policy, ppl):
    row = {"section": "kivi", "policy": policy, "context": 2048, "ppl": ppl, "cache_bytes": 1}
    return row if text is None else {**row, "text": text}


def test_tables_split_by_text_with_ratios_to_full_on_the_same_text():
    rows = [_kivi(None, "full", 10.0), _kivi(None, "kivi:2", 11.0), _kivi("code", "full", 4.0), _kivi("code", "kivi:2", 5.0)]
    out = kv.tables(rows)
    wiki, code = out.split("Test text: code")
    assert wiki.startswith("Test text: wiki")
    assert "11.000 (1.100x)" in wiki and "5.000" not in wiki
    assert "5.000 (1.250x)" in code and "11.000" not in code
    # one text: no heading, the tables as before
    assert not kv.tables(rows[:2]).startswith("Test text")


def test_across_gives_a_column_per_text_with_ratios_to_that_texts_full_cache():
    rows = [_kivi(None, "full", 10.0), _kivi(None, "kivi:2", 11.0), _kivi("code", "full", 4.0), _kivi("code", "kivi:2", 5.0)]
    rows += [{**_kivi("code", "kivi:2", 6.0), "context": 4096}, {**_kivi("code", "full", 5.0), "context": 4096}]
    h2o = {"section": "h2o", "text": "code", "fraction": 0.2, "budget": 819, "tokens": 4096, "policy": "h2o:1,1", "ppl": 5.5}
    h2o["passkey"] = {"correct": False, "key_logprob": -1.5}
    full = {"section": "h2o", "text": "code", "fraction": 1.0, "budget": 4096, "policy": "full", "passkey": {"correct": True, "key_logprob": -0.1}}
    out = kv.across(rows + [full, h2o])
    assert "| policy (ppl x full cache) | wiki 2k / 4k | code 2k / 4k |" in out
    assert "| kivi:2 | 1.100x / - | 1.250x / 1.200x |" in out  # wiki has no 4k row: a dash, not a ratio to another text
    assert "| 100% (4096) | full | - | 1.000x, -0.10 (found) |" in out
    assert "| 20% (819) | h2o:1,1 | - | 1.100x, -1.50 |" in out  # 5.5 against the full cache's 5.0 at 4096 on code
