"""benchmarks/kv_copies.py: copy distances, the split of a policy's extra loss, a run on a tiny model."""

import json
import sys

import pytest
import torch
from bench_scripts import load_script

from llmpress.errors import UserError

kc = load_script("kv_copies")


def test_copy_distance_finds_the_latest_earlier_bigram():
    #        t: 0  1  2  3  4  5  6  7  8
    ids = torch.tensor([5, 6, 7, 5, 6, 9, 5, 6, 7])
    d = kc.copy_distance(ids).tolist()  # targets t = 1..8
    # (5,6) at t=1 -> again at t=4 (3 back) and t=7 (3 back from 4); (6,7) at t=2 -> t=8 (6 back)
    assert d == [-1, -1, -1, 3, -1, -1, 3, 6]


def test_buckets_and_bad_edges():
    assert [b[0] for b in kc.buckets([4, 16])] == ["not a copy", "copy, 1-4 back", "copy, 5-16 back", "copy, over 16 back"]
    for bad in ([], [16, 4], [0, 4], [4, 4]):
        with pytest.raises(UserError, match="--edges"):
            kc.buckets(bad)


def test_split_shares_add_up_and_place_the_loss():
    dist = torch.tensor([-1, -1, 2, 3, 10, 40])
    full = torch.tensor([1.0, 2.0, 0.5, 0.5, 0.2, 0.1])
    other = full + torch.tensor([0.1, 0.1, 0.0, 0.0, 0.4, 1.4])  # the far copies lose most
    rows = kc.split(full, other, dist, [4, 16])
    by = {r["bucket"]: r for r in rows}
    assert sum(r["tokens"] for r in rows) == 6 and sum(r["token_share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["extra_share"] for r in rows) == pytest.approx(1.0)
    assert by["not a copy"]["full_nll"] == pytest.approx(1.5) and by["not a copy"]["extra_nll"] == pytest.approx(0.1)
    assert by["copy, 1-4 back"]["extra_share"] == pytest.approx(0.0)
    assert by["copy, over 16 back"]["extra_share"] == pytest.approx(1.4 / 2.0)


def test_run_on_a_tiny_model(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "kc.json"
    argv = ["kv_copies.py", "--model", str(tiny_model_dir), "--texts", str(tiny_text_file), "--tokens", "96", "--chunk", "16",
            "--edges", "8", "32", "--policies", "kivi:2,r16", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    kc.main()
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    assert sum(r["tokens"] for r in run["rows"]) == 95
    assert run["ppl"] != pytest.approx(run["full_ppl"], rel=1e-6)  # a 2-bit cache changes something
    assert sum(r["extra_share"] for r in run["rows"]) == pytest.approx(1.0)
    assert "| not a copy |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["kv_copies.py", "--texts", str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match="nope.txt"):
        kc.main()
