"""Greedy continuations of fixed prompts before and after compression, in every compress report."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model, tiny_llama, tiny_tokenizer
from helpers import QUIET, run_cli

from llmpress import api
from llmpress.eval.generate import PROMPTS, agreement, greedy_continuations


def _by_hand(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_continuations_are_the_greedy_tokens():
    tok = tiny_tokenizer(300)
    model = tiny_llama(vocab=len(tok)).eval()
    out = greedy_continuations(model, tok, new_tokens=6, prompts=PROMPTS[:2])
    assert [o["prompt"] for o in out] == list(PROMPTS[:2])
    for o in out:
        assert o["ids"] == _by_hand(model, tok, o["prompt"], 6)
        assert o["text"] == tok.decode(o["ids"], skip_special_tokens=True)


def test_agreement_counts_identical_prompts_and_the_common_prefix():
    a = [{"ids": [1, 2, 3, 4]}, {"ids": [5, 6, 7, 8]}]
    assert agreement(a, a) == {"identical": 2, "prompts": 2, "common_prefix": 1.0}
    b = [{"ids": [1, 2, 3, 4]}, {"ids": [5, 9, 7, 8]}]
    assert agreement(a, b) == {"identical": 1, "prompts": 2, "common_prefix": pytest.approx((1.0 + 0.25) / 2)}


def test_compress_reports_them_and_zero_turns_them_off(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    kw = dict(calib=api.CalibConfig(n_samples=4, seqlen=32, batch_size=4), engine=QUIET)
    rep = api.run_pipeline(str(model), "rtn-w3g64", evaluation=api.EvalConfig(seqlen=32, max_windows=2, generate_tokens=5), **kw)
    before, after = rep.baseline["generations"], rep.compressed["generations"]
    assert [g["prompt"] for g in before] == list(PROMPTS) and all(len(g["ids"]) == 5 for g in before + after)
    assert rep.compressed["generation_agreement"] == agreement(before, after)
    assert rep.seconds["baseline_generate"] > 0 and rep.seconds["compressed_generate"] > 0
    off = api.run_pipeline(str(model), "rtn-w3g64", evaluation=api.EvalConfig(seqlen=32, max_windows=2, generate_tokens=0), **kw)
    assert "generations" not in off.baseline and "generation_agreement" not in off.compressed
    # the command line: the row in the table, the texts in the JSON
    base = ["compress", str(model), "--recipe", "rtn-w4g64", "--seqlen", "32", "--eval-windows", "2", "--no-progress"]
    assert run_cli([*base, "--generate-tokens", "4", "--json", str(tmp_path / "r.json")]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("greedy continuations as baseline's"))
    g = json.loads((tmp_path / "r.json").read_text())["compressed"]["generation_agreement"]
    assert row.split()[-5] == f"{g['identical']}/{g['prompts']}"
    assert run_cli([*base, "--generate-tokens", "-1"]) == 2
