"""Text and token windows (llmpress.data): the packaged sources and their splits, user files,
the token stream, evaluation and calibration windows. Source lists and mixes: test_sources.py."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_tokenizer

from llmpress import data
from llmpress.errors import UserError

STREAM = torch.arange(100, 200)  # 100 distinct tokens: a window's values tell where it was cut


def test_packaged_source_names():
    assert data.PACKAGED == ("wiki", "news", "code")


@pytest.mark.parametrize("source, n_test, n_calib", [("wiki", 11, 94), ("news", 80, 267), ("code", 14, 121)])
def test_packaged_splits_are_disjoint_and_stable(source, n_test, n_calib):
    test, calib = data.documents(source, "test"), data.documents(source, "calib")
    assert (len(test), len(calib)) == (n_test, n_calib)
    assert not set(test) & set(calib)
    if source == "news":  # the split is by position; the Lee background file holds 3 documents twice
        # (positions 117/120, 150/156, 230/236): the copies that would fall on the calibration side are left out
        background = data.news_text()
        by_position = [d for i, d in enumerate(background) if i % 10]
        left_out = [d for d in by_position if d in test]
        assert len(left_out) == 3 and all(background.count(d) == 2 for d in left_out)
        assert calib == [d for d in by_position if d not in left_out]
    assert all(d.strip() for d in test + calib)
    assert data.documents(source, "train") == calib
    assert data.documents(source, "test") == test  # the same documents, in the same order, every time


def test_news_test_split_adds_the_evaluation_documents():
    background = data.news_text()
    test = data.documents("news", "test")
    assert test[:30] == background[::10] and test[30:] == data.news_text(data.NEWS_TEST_FILE)
    assert len(test) - 30 == 50


def test_unknown_split_is_refused():
    with pytest.raises(UserError, match="unknown split 'dev'; expected 'calib' or 'test'"):
        data.documents("wiki", "dev")


def test_user_files_plain_and_jsonl(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("one document\nover two lines\n")
    assert data.documents(str(plain), "calib") == data.documents(str(plain), "test") == ["one document\nover two lines\n"]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "first"}\n\n{"text": "  "}\n{"text": "second", "id": 3}\n')
    assert data.read_text_file(jl) == ["first", "second"]  # blank lines and blank texts skipped
    with pytest.raises(UserError, match="is empty"):
        (tmp_path / "e.txt").write_text(" \n")
        data.read_text_file(tmp_path / "e.txt")
    with pytest.raises(UserError, match=r"text file '.*nope\.txt' not found"):
        data.read_text_file(tmp_path / "nope.txt")


def test_tokenize_joins_documents_with_eos():
    tok = tiny_tokenizer()
    ids = data.tokenize(["the quick fox", "a model"], tok)
    a = tok("the quick fox", add_special_tokens=False)["input_ids"]
    b = tok("a model", add_special_tokens=False)["input_ids"]
    assert ids.dtype == torch.long and ids.tolist() == a + [tok.eos_token_id] + b + [tok.eos_token_id]


def test_eval_windows_are_consecutive_from_the_start():
    w = data.eval_windows(STREAM, seqlen=30)
    assert w.shape == (3, 30) and torch.equal(w.flatten(), STREAM[:90])
    assert torch.equal(data.eval_windows(STREAM, seqlen=30, max_windows=2), w[:2])
    wb = data.eval_windows(STREAM, seqlen=30, bos=1)  # BOS then 29 text tokens per window
    assert wb.shape == (3, 30) and (wb[:, 0] == 1).all()
    assert torch.equal(wb[:, 1:].flatten(), STREAM[:87])
    with pytest.raises(UserError, match="text has 100 tokens, fewer than one window of 101"):
        data.eval_windows(STREAM, seqlen=101)


def test_calib_windows_are_deterministic_per_seed():
    a = data.calib_windows(STREAM, n=6, seqlen=10, seed=0)
    assert a.shape == (6, 10)
    assert torch.equal(a, data.calib_windows(STREAM, n=6, seqlen=10, seed=0))
    assert not torch.equal(a, data.calib_windows(STREAM, n=6, seqlen=10, seed=1))
    starts = (a[:, 0] - 100).tolist()
    assert all(0 <= s < 90 for s in starts)
    assert all(torch.equal(row, STREAM[s : s + 10]) for row, s in zip(a, starts))  # contiguous slices
    g = torch.Generator().manual_seed(0)
    assert starts == torch.randint(0, 90, (6,), generator=g).tolist()  # the documented draw
    b = data.calib_windows(STREAM, n=6, seqlen=10, seed=0, bos=1)
    assert (b[:, 0] == 1).all() and torch.equal(b[:, 1:], a[:, :-1])
    with pytest.raises(UserError, match="calibration text has 100 tokens, need more than 100"):
        data.calib_windows(STREAM, n=1, seqlen=100)


def test_check_sources(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("text")
    data.check_sources(["wiki", "news", "code", str(f)])  # packaged names are never looked up on disk
    with pytest.raises(UserError, match=r"text file 'wikii' not found \(packaged texts: wiki, news, code\)"):
        data.check_sources(["wiki", "wikii"])
