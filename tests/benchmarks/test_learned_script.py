"""benchmarks/learned.py (issue 19): the table of a fabricated results JSON and the row specs
(W2 and parallel variants of the presets, a missing preset skipped); no model is loaded."""

import json

from bench_scripts import load_script

lr = load_script("learned")

RES = {
    "model": "smollm2-135m",
    "windows": {"wiki": 64, "news": 25, "code": 64},
    "calib_samples": 128,
    "fp": {"wiki": 10.0, "news": 20.0, "code": 5.0},
    "rows": {
        "mixed-3.25-gptq": {"ppl": {"wiki": 15.0, "news": 26.0, "code": 6.5}, "bits_per_weight": 3.2491, "compress_s": 99.0},
        "autoround-w3g64-light": {"ppl": {"wiki": 16.0, "news": 28.0, "code": 7.0}, "bits_per_weight": 3.25, "compress_s": 250.5},
        "blockwise-w3g64-parallel": {"ppl": {"wiki": 17.0, "news": 29.0, "code": 7.25}, "bits_per_weight": 3.25, "compress_s": 120.0},
        "gptq-w4g64": {"ppl": {"wiki": 12.8, "news": 25.0, "code": 6.0}, "bits_per_weight": 4.25, "compress_s": 61.0},
    },
}


def test_table_values_classes_and_order(tmp_path, capsys):
    path = tmp_path / "learned.json"
    path.write_text(json.dumps(RES))
    assert lr.main(["--table", "--out", str(path)]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| W") or ln.startswith("| 3")]
    assert rows == [
        "| W4 g64 | gptq-w4g64 | 12.800 (1.280x) | 25.000 (1.250x) | 6.000 (1.200x) | 4.250 | 61.0 |",
        "| W3 g64 | blockwise-w3g64-parallel (parallel) | 17.000 (1.700x) | 29.000 (1.450x) | 7.250 (1.450x) | 3.250 | 120.0 |",
        "| W3 g64 | autoround-w3g64-light | 16.000 (1.600x) | 28.000 (1.400x) | 7.000 (1.400x) | 3.250 | 250.5 |",
        "| 3.25 avg | mixed-3.25-gptq | 15.000 (1.500x) | 26.000 (1.300x) | 6.500 (1.300x) | 3.249 | 99.0 |",
    ]


def test_row_specs():
    assert lr.label("blockwise-w3g64") == "blockwise-w3g64 (corrective)"  # the preset's mode
    assert lr.label("blockwise-w3g64-sequential") == "blockwise-w3g64-sequential (sequential)"
    assert lr.label("blockwise-w4g64-v1").startswith("blockwise-w4g64-v1: blockwise-w4g64 before")
    assert lr.ROWS["mixed-3.25-rtn-unweighted"]["weighting"] == "none" and "weighting" not in lr.ROWS["mixed-3.25-rtn"]
    assert lr.label("mixed-3.25-blockwise-learned").endswith(
        "(corrective, weighting auto, plan on blockwise-w3g64, layer errors after blockwise at each setting)"
    )
    tok = lr.ROWS["mixed-3.25-blockwise-token"]
    assert (tok["weighting"], tok["base"], tok["budget"]) == ("fisher-token", "blockwise-w3g64", 3.25)
    assert lr.label("mixed-3.25-blockwise-token").endswith(
        ", errors weighted per channel and per token, plan on blockwise-w3g64, layer errors after GPTQ)"
    )
    assert lr.label("blockwise-w2g64-parallel") == "blockwise-w2g64-parallel (parallel, blockwise-w3g64 at 2 bits)"
    assert lr.label("gptq-w4g64") == "gptq-w4g64"
    long = lr.recipe_of("awq-blockwise-w3g64-long", lr.ROWS["awq-blockwise-w3g64-long"])
    assert [s["method"] for s in long["stages"]] == ["awq", "blockwise"]
    assert (long["stages"][1]["iters"], long["stages"][1]["windows_per_step"]) == (140, 8)
    assert lr.label("awq-blockwise-w3g64-long").endswith("(AWQ scales first, corrective, 140 steps of 8 windows, lr 0.007)")
    assert lr.recipe_of("gptq-w4g64", lr.ROWS["gptq-w4g64"]) == "gptq-w4g64"
    par = lr.recipe_of("blockwise-w2g64-parallel", lr.ROWS["blockwise-w2g64-parallel"])
    st = par["stages"][0]
    assert (st["method"], st["mode"], st["weights"]["bits"], st["weights"]["group_size"]) == ("blockwise", "parallel", 2, 64)
    awq = lr.recipe_of("awq-gptq-w2g64", lr.ROWS["awq-gptq-w2g64"])
    assert [s["weights"]["bits"] for s in awq["stages"]] == [2, 2]  # the AWQ search and GPTQ both at 2 bits
    assert lr.recipe_of("x", {"kind": "preset", "name": "no-such-preset"}) is None
    peers = {k: v for k, v in lr.ROWS.items() if v["kind"] == "peer"}
    assert len(peers) == 6 and lr.PEER_SETTINGS["light"] == {"iters": 50, "lr": 5e-3}
    mixed = {k: (v["budget"], v["solver"]) for k, v in lr.ROWS.items() if v["kind"] == "mixed"}
    assert mixed == {
        "mixed-3.25-rtn": (3.25, "rtn"),
        "mixed-3.25-gptq": (3.25, "gptq"),
        "mixed-4.25-rtn": (4.25, "rtn"),
        "mixed-4.25-gptq": (4.25, "gptq"),
        "mixed-3.25-rtn-unweighted": (3.25, "rtn"),
        "mixed-4.25-rtn-unweighted": (4.25, "rtn"),
        "mixed-3.25-blockwise": (3.25, "gptq"),
        "mixed-4.25-blockwise": (4.25, "gptq"),
        "mixed-3.25-blockwise-groups": (3.25, "gptq"),
        "mixed-3.25-blockwise-w3up": (3.25, "gptq"),
        "mixed-3.25-blockwise-measured": (3.25, "gptq"),
        "mixed-4.25-blockwise-measured": (4.25, "gptq"),
        "mixed-3.25-blockwise-token": (3.25, "gptq"),
        "mixed-4.25-blockwise-token": (4.25, "gptq"),
        "mixed-3.25-gptq-token": (3.25, "gptq"),
        "mixed-4.25-gptq-token": (4.25, "gptq"),
        "mixed-3.25-blockwise-groups-token": (3.25, "gptq"),
        "mixed-3.25-blockwise-learned": (3.25, "blockwise"),
        "mixed-4.25-blockwise-learned": (4.25, "blockwise"),
        "mixed-3.25-awq-blockwise": (3.25, "gptq"),
        "mixed-4.25-awq-blockwise": (4.25, "gptq"),
    }
    assert {lr.ROWS[f"mixed-{b}-awq-blockwise"]["base"] for b in ("3.25", "4.25")} == {"awq-blockwise-w3g64"}
    assert lr.ROWS["mixed-3.25-blockwise"]["base"] == "blockwise-w3g64" and "base" not in lr.ROWS["mixed-3.25-gptq"]
    assert lr.label("mixed-3.25-blockwise") == "mixed-3.25-blockwise (corrective, plan on blockwise-w3g64, layer errors after GPTQ)"
    groups = lr.ROWS["mixed-3.25-blockwise-groups"]
    assert {k: v for k, v in groups.items() if k != "candidates"} == lr.ROWS["mixed-3.25-blockwise"]
    assert "w3g128" in groups["candidates"] and "w3g32" in groups["candidates"]
    assert lr.label("mixed-3.25-blockwise-groups").endswith(f"layer errors after GPTQ, candidates {lr.GROUP_CANDIDATES})")
    w3up = lr.ROWS["mixed-3.25-blockwise-w3up"]
    assert {k: v for k, v in w3up.items() if k != "candidates"} == lr.ROWS["mixed-3.25-blockwise"]
    assert set(w3up["candidates"].split(",")) == set(lr.GROUP_CANDIDATES.split(",")) - {"w2g64"}
    measured = lr.ROWS["mixed-3.25-blockwise-measured"]
    assert measured["measure"] == "block" and {k: v for k, v in measured.items() if k != "measure"} == lr.ROWS["mixed-3.25-blockwise"]
    assert lr.label("mixed-3.25-blockwise-measured").endswith("errors measured on the block output)")


def test_w4a4_rows_are_existing_presets():
    from llmpress.recipe import presets

    rows = {k: v for k, v in lr.ROWS.items() if v["class"] == "W4A4KV4"}
    presets_rows = {
        "quarot-w4a4kv4-gptq",
        "duquant-w4a4kv4-gptq",
        "quarot-w4a4kv4-omniquant",
        "duquant-w4a4kv4-blockwise",
        "quarot-w4a4kv4-blockwise",
    }
    assert set(rows) == presets_rows | {"duquant-w4a4kv4-gptq-alpha-auto"}
    assert all(lr.recipe_of(k, rows[k]) == k and k in presets() for k in presets_rows)
    auto = lr.recipe_of("duquant-w4a4kv4-gptq-alpha-auto", rows["duquant-w4a4kv4-gptq-alpha-auto"])
    assert [st.get("smooth_alpha") for st in auto["stages"]] == ["auto", None, None]  # only the duquant stage


def test_awq_blockwise_rows_put_awq_first():
    from llmpress.recipe import Recipe

    for bits in (4, 3, 2):
        key = f"awq-blockwise-w{bits}g64"
        d = lr.recipe_of(key, lr.ROWS[key])
        assert [st["method"] for st in d["stages"]] == ["awq", "blockwise"]
        assert [st["weights"]["bits"] for st in d["stages"]] == [bits, bits]
        assert d["stages"][0]["quantize"] is False  # AWQ only scales; blockwise rounds
        assert [st.method for st in Recipe.from_dict(d).stages] == ["awq", "blockwise"]  # a valid recipe
    assert lr.label("awq-blockwise-w2g64") == "awq-blockwise-w2g64 (AWQ scales first, corrective, blockwise-w3g64 at 2 bits)"
