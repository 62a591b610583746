"""Several evaluation sources (`--eval-data wiki,news,FILE`) and calibration mixes
(`--calib-data wiki:0.75,news:0.25`): parsing, window counts, determinism, per-source reports.

The refusals (exit code 2) are rows of docs/errors.md and live in tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import TINY_TEXT, save_tiny_model, tiny_gemma3, tiny_llama, tiny_tokenizer

from llmpress import api, data
from llmpress.cli import build_parser, compress_options, eval_config, main
from llmpress.errors import UserError
from llmpress.report import Report

pytestmark = pytest.mark.usefixtures("private_cache", "restore_logging")

DIGITS = " ".join(f"{i * 7919 % 100000:05d}" for i in range(4000))  # tokens of digits only
LETTERS = TINY_TEXT.replace(".", " ").replace(",", " ").replace(";", " ") * 3  # tokens of letters only


@pytest.fixture
def texts(tmp_path):
    """Two text files whose tokens never overlap (digits / letters): a window tells its source."""
    a, b = tmp_path / "digits.txt", tmp_path / "letters.txt"
    a.write_text(DIGITS)
    b.write_text(LETTERS)
    return str(a), str(b)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --------------------------------------------------------------------------- parsing and counts


def test_parse_sources_shares_and_equal_splits(tmp_path):
    assert data.parse_sources("wiki", shares=True) == [("wiki", 1.0)]
    assert data.parse_sources("wiki,news", shares=True) == [("wiki", 0.5), ("news", 0.5)]
    assert data.parse_sources(" wiki : 0.75 , news:0.25", shares=True) == [("wiki", 0.75), ("news", 0.25)]
    assert data.parse_sources("wiki:0.3333333,news:0.3333333,code:0.3333334", shares=True)[2] == ("code", 0.3333334)
    thirds = data.parse_sources("wiki,news,code", shares=False)
    assert [s for s, _ in thirds] == ["wiki", "news", "code"] and all(w == pytest.approx(1 / 3) for _, w in thirds)
    odd = tmp_path / "a:0.5"  # an existing file is never split at its colon
    odd.write_text("x")
    assert data.parse_sources(f"{odd},wiki", shares=True) == [(str(odd), 0.5), ("wiki", 0.5)]
    assert data.parse_sources("wiki:0.5", shares=False) == [("wiki:0.5", 1.0)]  # evaluation lists take no shares
    comma = tmp_path / "a,b.txt"  # nor a file whose name holds a comma at it
    comma.write_text("x")
    assert data.parse_sources(str(comma), shares=False) == [(str(comma), 1.0)] == data.parse_sources(comma, shares=True)
    assert data.parse_sources("wiki:0.75,news:0.25000002", shares=True)[1] == ("news", 0.25000002)  # within 1e-6 of 1
    with pytest.raises(UserError, match="shares sum to 1.000002, expected 1"):
        data.parse_sources("wiki:0.75,news:0.250002", shares=True)
    with pytest.raises(UserError, match="shares sum to 0.3, expected 1"):
        data.parse_sources("wiki:0.1,news:0.2", shares=True)


@pytest.mark.parametrize("text, fragment", [
    ("wiki,,news", "empty item"), ("wiki,", "empty item"), ("", "empty item"), ("wiki,wiki", "wiki is listed twice"),
    ("wiki:0.5,news", "a share for every source or for none"), ("wiki:0.5,news:0.3", "shares sum to 0.8, expected 1"),
    ("wiki:x,news:1", "share 'x' of wiki is not a number"), ("wiki:0,news:1", "share 0 of wiki must be a number greater than 0"),
    ("wiki:-0.5,news:1.5", "share -0.5 of wiki must be"), ("wiki:nan,news:1", "share nan of wiki must be"),
    ("wiki:0.5,:0.5", "share '0.5' names no source"),
])  # fmt: skip
def test_parse_sources_refusals(text, fragment):
    with pytest.raises(UserError, match="calibration data") as e:
        api.CalibConfig(source=text)
    assert fragment in str(e.value)


def test_eval_config_sources_and_refusals():
    assert api.EvalConfig().sources == ("wiki",)
    assert api.EvalConfig(source="wiki,news,code,x.txt").sources == ("wiki", "news", "code", "x.txt")
    for bad, fragment in (("wiki,,news", "empty item"), ("news,wiki,news", "news is listed twice"), (",", "empty item")):
        with pytest.raises(UserError, match="evaluation data") as e:
            api.EvalConfig(source=bad)
        assert fragment in str(e.value)


def test_mix_counts_largest_remainder():
    assert data.mix_counts([1.0], 128) == [128]
    assert data.mix_counts([0.75, 0.25], 8) == [6, 2]
    assert data.mix_counts([0.5, 0.5], 7) == [4, 3]  # a tie goes to the earlier source
    assert data.mix_counts([0.5, 0.3, 0.2], 7) == [4, 2, 1]  # 3.5, 2.1, 1.4: remainders .5 > .4 > .1
    assert data.mix_counts([1 / 3] * 3, 10) == [4, 3, 3]
    assert data.mix_counts([0.9, 0.05, 0.05], 4) == [4, 0, 0]
    rng = random.Random(0)
    for _ in range(200):
        shares = [rng.random() + 1e-3 for _ in range(rng.randint(1, 5))]
        n = rng.randint(1, 300)
        counts = data.mix_counts([s / sum(shares) for s in shares], n)
        assert sum(counts) == n
        assert all(abs(c - s / sum(shares) * n) < 1 for c, s in zip(counts, shares))


def test_mix_seeds_differ_by_position_and_seed():
    seeds = {data.mix_seed(s, i) for s in (0, 1, -3) for i in range(3)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    assert data.mix_seed(5, 1) == data.mix_seed(5, 1)


# ----------------------------------------------------------------------------- calibration windows


@pytest.mark.parametrize("source, family", [("news", "llama"), ("file", "llama"), ("news", "gemma3")])
def test_single_source_draws_the_same_windows_as_before(tok, texts, source, family):
    source = texts[1] if source == "file" else source
    model = (tiny_llama if family == "llama" else tiny_gemma3)(vocab=len(tok))
    bos = {"llama": None, "gemma3": tok.bos_token_id}[family]  # gemma3 windows start with BOS
    assert api.bos_for(tok, model) == bos
    cfg = api.CalibConfig(source=source, n_samples=9, seqlen=32, seed=3)
    got = api.calibration_windows(tok, model, cfg)
    stream = data.token_stream(source, "calib", tok)
    assert torch.equal(got, data.calib_windows(stream, 9, 32, 3, bos))
    assert api.calibration_counts(cfg) == {source: 9}


def _from_digits(tok, windows: torch.Tensor) -> list[bool]:
    digit_ids = set(tok.convert_tokens_to_ids(list("0123456789")))
    other = set(tok.convert_tokens_to_ids(["Ġ"])) | set(tok.all_special_ids)  # space, BOS, EOS: in both texts
    out = []
    for w in windows.tolist():
        digits, letters = any(t in digit_ids for t in w), any(t not in digit_ids | other for t in w)
        assert digits != letters, w  # every window comes from exactly one source
        out.append(digits)
    return out


def test_mix_counts_proportions_order_and_determinism(tok, texts):
    model = tiny_gemma3(vocab=len(tok))  # windows start with BOS
    digits, letters = texts
    cfg = api.CalibConfig(source=f"{digits}:0.75,{letters}:0.25", n_samples=12, seqlen=24, seed=5)
    w = api.calibration_windows(tok, model, cfg)
    assert w.shape == (12, 24) and (w[:, 0] == tok.bos_token_id).all() and api.bos_for(tok, model) == tok.bos_token_id
    origin = _from_digits(tok, w)
    assert origin.count(True) == 9 and origin.count(False) == 3
    assert origin != sorted(origin, reverse=True)  # shuffled, not 9 digit windows then 3 letter ones
    assert api.calibration_counts(cfg) == {digits: 9, letters: 3}
    # each source's windows are its own draw with the derived seed, shuffled by cfg.seed
    parts = [data.calib_windows(data.token_stream(s, "calib", tok), k, 24, data.mix_seed(5, i), tok.bos_token_id)
             for i, (s, k) in enumerate(((digits, 9), (letters, 3)))]  # fmt: skip
    assert torch.equal(w, torch.cat(parts)[torch.randperm(12, generator=torch.Generator().manual_seed(5))])
    # same config: bitwise the same windows; another seed: others
    assert torch.equal(w, api.calibration_windows(tok, model, api.CalibConfig(source=cfg.source, n_samples=12, seqlen=24, seed=5)))
    assert not torch.equal(w, api.calibration_windows(tok, model, api.CalibConfig(source=cfg.source, n_samples=12, seqlen=24, seed=6)))
    # equal shares without proportions
    even = api.calibration_windows(tok, model, api.CalibConfig(source=f"{letters},{digits}", n_samples=7, seqlen=24, seed=5))
    assert _from_digits(tok, even).count(False) == 4  # 3.5 each: the tie goes to the first source (letters)


def test_mix_with_a_source_too_short_names_it(tok, texts, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    model = tiny_llama(vocab=len(tok))
    with pytest.raises(UserError, match=f"calibration source '{short}': calibration text has"):
        api.calibration_windows(tok, model, api.CalibConfig(source=f"{texts[0]},{short}", n_samples=4, seqlen=24))


def test_cli_lists_reach_the_configs():
    args = build_parser().parse_args(["compress", "m", "--recipe", "gptq-w4g64", "--calib-data", "wiki:0.75,news:0.25",
                                      "--eval-data", "wiki,news,code"])  # fmt: skip
    kw = compress_options(args)
    assert kw["calib"].mix == (("wiki", 0.75), ("news", 0.25))
    assert kw["evaluation"].sources == ("wiki", "news", "code") and kw["evaluation"].source == "wiki,news,code"
    assert eval_config(build_parser().parse_args(["eval", "d", "--eval-data", "code,x.txt"])).sources == ("code", "x.txt")


# ------------------------------------------------------------------------------- per-source reports


def _run(model_dir, eval_source: str, calib_source: str) -> Report:
    return api.run_pipeline(
        str(model_dir), "gptq-w4g64", calib=api.CalibConfig(source=calib_source, n_samples=8, seqlen=32, batch_size=4),
        evaluation=api.EvalConfig(source=eval_source, seqlen=32, max_windows=3), engine=api.EngineOptions(batch_size=4, progress=False),
    )  # fmt: skip


def test_each_source_figure_equals_its_single_source_run(tmp_path, texts):
    model_dir = save_tiny_model(tmp_path / "m")
    digits, letters = texts
    short = tmp_path / "short.txt"  # two windows of 32 tokens at most: fewer than max_windows
    short.write_text(LETTERS[:60])
    calib = f"news:0.5,{letters}:0.5"
    multi = _run(model_dir, f"news,{digits},{short}", calib)
    sources = ["news", digits, str(short)]
    assert list(multi.baseline["ppl_by_source"]) == sources == list(multi.compressed["ppl_by_source"])
    assert multi.baseline["ppl"] == multi.baseline["ppl_by_source"]["news"]
    assert multi.compressed["ppl"] == multi.compressed["ppl_by_source"]["news"]
    n_short = data.eval_windows(data.token_stream(str(short), "test", tiny_tokenizer()), 32, None, 1).shape[0]
    assert 1 <= n_short < 3
    assert multi.evaluation["windows_by_source"] == {"news": 3, digits: 3, str(short): n_short}
    assert multi.evaluation["windows"] == 3 and multi.evaluation["tokens_scored"] == 3 * 31
    assert multi.calibration["windows_by_source"] == {"news": 4, letters: 4}
    for s in sources:  # exactly what a run on that source alone measures
        single = _run(model_dir, s, calib)
        assert single.baseline["ppl_by_source"] == {s: single.baseline["ppl"]}
        assert single.baseline["ppl"] == multi.baseline["ppl_by_source"][s]
        assert single.compressed["ppl"] == multi.compressed["ppl_by_source"][s]
    d = multi.to_dict()
    assert d["ppl_ratio"] == multi.compressed["ppl"] / multi.baseline["ppl"]
    assert d["ppl_ratio_by_source"][digits] == multi.compressed["ppl_by_source"][digits] / multi.baseline["ppl_by_source"][digits]
    lines = multi.table().splitlines()
    rows = [ln for ln in lines if ln.startswith("perplexity")]
    assert [r.split("  ")[0] for r in rows] == [f"perplexity ({s})" for s in sources]  # no single "perplexity ratio" row
    b, c = multi.baseline["ppl_by_source"][digits], multi.compressed["ppl_by_source"][digits]
    assert rows[1].split()[-3:] == [f"{b:.3f}", f"{c:.3f}", f"({c / b:.3f}x)"]


def test_table_of_one_source_is_unchanged():
    rep = Report(model="m", recipe={}, baseline={"ppl": 20.0, "ppl_by_source": {"wiki": 20.0}, "bits_per_weight": 32.0},
                 compressed={"ppl": 25.0, "ppl_by_source": {"wiki": 25.0}, "bits_per_weight": 4.25})  # fmt: skip
    rows = {ln.split("  ")[0]: ln.split()[-2:] for ln in rep.table().splitlines() if ln.startswith("perplexity")}
    assert rows == {"perplexity": ["20.000", "25.000"], "perplexity ratio": ["1.000", "1.250"]}
    two = Report(model="m", recipe={}, baseline={"ppl": 20.0, "ppl_by_source": {"wiki": 20.0, "news": 30.0}},
                 compressed={"ppl": 25.0, "ppl_by_source": {"wiki": 25.0, "news": 33.0}})  # fmt: skip
    rows = {ln.split("  ")[0]: ln.split()[-3:] for ln in two.table().splitlines() if ln.startswith("perplexity")}
    assert rows == {"perplexity (wiki)": ["20.000", "25.000", "(1.250x)"], "perplexity (news)": ["30.000", "33.000", "(1.100x)"]}


def test_eval_command_with_several_sources(tmp_path, texts, capsys):
    model_dir = save_tiny_model(tmp_path / "m")
    digits, letters = texts
    out_json = tmp_path / "ev.json"
    argv = ["eval", str(model_dir), "--eval-data", f"{letters},news,{digits}", "--seqlen", "32", "--eval-windows", "2",
            "--no-progress", "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    ev = {s: api.evaluate(str(model_dir), api.EvalConfig(source=s, seqlen=32, max_windows=2), progress=False).compressed["ppl"]
          for s in (letters, "news", digits)}  # fmt: skip
    assert printed["ppl_by_source"] == ev and printed["ppl"] == ev[letters]
    rep = json.loads(out_json.read_text())
    assert rep["compressed"]["ppl_by_source"] == ev
    assert rep["evaluation"]["windows_by_source"] == {letters: 2, "news": 2, digits: 2}
    assert [p["phase"] for p in rep["memory"]["phases"]] == ["startup", "load", "eval_data", "eval"]
