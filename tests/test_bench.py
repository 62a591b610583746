"""`llmpress bench` on a tiny model: every figure is there and self-consistent."""

from __future__ import annotations

import json

import pytest
import torch

from llmpress import bench
from llmpress.cli import main
from llmpress.errors import UserError


@pytest.fixture
def w4_dir(tmp_path, tiny_model_dir):
    out = tmp_path / "w4"
    assert main(["compress", str(tiny_model_dir), "--recipe", "rtn-w4g64", "--out", str(out), "--no-eval", "--no-progress"]) == 0
    return out


def test_bench_cli(tmp_path, w4_dir, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(bench, "_windows", lambda tok, model, cfg: torch.randint(3, 200, (max(cfg.batches), cfg.prefill_tokens)))
    js = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            str(w4_dir),
            "--prefill-tokens",
            "32",
            "--decode-tokens",
            "4",
            "--batches",
            "1",
            "2",
            "--repeats",
            "1",
            "--json",
            str(js),
            "--no-memory-probe",
        ]
    )  # probes: one process each, tested below
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(js.read_text())
    assert res["baseline"] == str(tiny_model_dir)
    assert list(res["variants"]) == ["fp32", "bf16", "w4"]
    for v in res["variants"].values():
        assert v["prefill_ms"] > 0 and v["decode_tok_s_b1"] > 0 and v["decode_tok_s_b2"] > 0
        assert len(v["raw_seconds"]["prefill"]) == 1
    fp32, bf16, w4 = (res["variants"][k] for k in ("fp32", "bf16", "w4"))
    assert fp32["greedy_agreement_with_fp32"] == 1.0
    assert bf16["resident_weight_bytes"] == pytest.approx(fp32["resident_weight_bytes"] / 2, rel=1e-3)  # (rotary buffers stay float32)
    assert w4["resident_weight_bytes"] < fp32["resident_weight_bytes"]
    ck = w4["checkpoint"]
    assert ck["file_bytes"] == (w4_dir / "model.llmpress.safetensors").stat().st_size
    assert abs(ck["file_bytes"] / ck["theoretical_bytes"] - 1) < 0.1
    assert fp32["checkpoint"]["file_bytes"] == (tiny_model_dir / "model.safetensors").stat().st_size
    kernels = {(k["kernel"], k["rows"]) for k in res["layer_kernels"]}
    from llmpress.runtime.cpu_kernels import kernels as own_kernels

    name = "llmpress_int4_cpu" if own_kernels() is not None else "int4pack_mm_cpu"
    assert (name, 1) in kernels and (name, 32) in kernels
    assert 0 < w4["head_ms_per_step"] < w4["linears_ms_per_step"]  # the tiny model's head is one of its linears
    for needle in ("| w4 |", "decode tok/s b=1", "Ratios", "Checkpoint size against theory", "Per-layer kernels"):
        assert needle in out


def test_memory_probe(w4_dir):
    """What each probe subprocess runs (here in this process: the figures' consistency)."""
    cfg = bench.BenchConfig(prefill_tokens=16, batches=(1, 2), prompt_tokens=4)
    v = bench.plan_variants([str(w4_dir)])[0][2]
    res = bench.probe(v, cfg)
    assert res["peak_rss_mb"] >= res["rss_after_load_mb"] > 0 and res["load_s"] > 0
    model, _ = v.load()
    assert res["resident_weight_bytes"] == bench.resident_bytes(model)
    import json as _json

    assert (
        bench._probe_main(_json.dumps({"variant": {"name": "none", "kind": "none", "path": ""}, "config": {**cfg.__dict__, "batches": [1]}}))[
            "rss_mb"
        ]
        > 0
    )


def test_baseline_must_be_known(tmp_path, w4_dir, tiny_model_dir):
    vs, base = bench.plan_variants([str(w4_dir)])
    assert base == str(tiny_model_dir) and [v.name for v in vs] == ["fp32", "bf16", "w4"]
    with pytest.raises(UserError, match="baseline"):
        bench.plan_variants([str(w4_dir), str(tmp_path)])  # two candidate baselines
    vs, _ = bench.plan_variants([str(tiny_model_dir)])
    assert [v.kind for v in vs] == ["dense", "dense"]


def test_decode_is_greedy_with_cache(tiny_model_dir):
    from llmpress import models

    m, _ = models.load(str(tiny_model_dir))
    prompt = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    _, toks = bench.decode(m, prompt, 5)
    assert toks.shape == (2, 6)
    with torch.no_grad():  # the same tokens as greedy decoding without a cache
        ids = prompt
        for _ in range(6):
            ids = torch.cat([ids, m(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(toks, ids[:, 8:])
