"""Saving a structurally pruned model: config.json has the smaller sizes; plain transformers
loads the HF folder and llmpress loads the packed one, with the same logits; pruning then
quantizing in one recipe saves packed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODELS, random_windows, tiny_tokenizer
from helpers import QUIET, logits

import llmpress
from llmpress import stage
from llmpress.checkpoint import load_compressed, save

STRUCTURED = [
    stage("drop_layers", count=1),
    stage("prune_width", structure="mlp", ratio=0.25),
    stage("prune_width", structure="heads", ratio=0.5),
]


def _pruned(family: str, extra=()):
    tok = tiny_tokenizer()
    m = TINY_MODELS[family](layers=3, vocab=len(tok))
    report = llmpress.compress(m, [*STRUCTURED, *extra], data=random_windows(8, 32, vocab=len(tok)), engine=QUIET)
    return m, tok, report


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_saved_pruned_model_loads_in_plain_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    m, tok, report = _pruned(family)
    assert report.compressed["n_params"] < sum(p.numel() for p in TINY_MODELS[family](layers=3, vocab=len(tok)).parameters())
    ids = random_windows(2, 32, vocab=len(tok), seed=7)
    want = logits(m, ids)
    save(m, tok, tmp_path / "hf", report=report, format="hf-fakequant")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        2,
        96,
        2,
        1,
        16,
    )
    if family == "gemma3":
        assert len(cfg["layer_types"]) == 2
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(plain, ids), want, rtol=0, atol=1e-5)
    out = plain.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)  # the cache works with the renumbered blocks
    assert out.shape == (1, 14)

    save(m, tok, tmp_path / "packed", report=report)
    cfg = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_key_value_heads"]) == (2, 96, 1)
    loaded, _ = load_compressed(str(tmp_path / "packed"))
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-5)


def test_prune_then_quantize_saves_packed(tmp_path):
    w4 = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 32}
    m, tok, report = _pruned("llama", extra=[stage("rtn", weights=w4)])
    recs = report.result.records
    assert len(recs) == 2 * 7  # two blocks left, every linear quantized at its new shape
    assert recs["model.layers.1.mlp.down_proj"].in_features == 96 and recs["model.layers.0.self_attn.k_proj"].out_features == 16
    assert all(r.weight_args.bits == 4 for r in recs.values())
    ids = random_windows(2, 32, vocab=len(tok), seed=7)
    want = logits(m, ids)
    save(m, tok, tmp_path / "packed", report=report)
    meta = json.loads((tmp_path / "packed" / "llmpress.json").read_text())
    assert meta["layers"]["model.layers.1.mlp.down_proj"]["shape"] == [64, 96]
    loaded, _ = load_compressed(str(tmp_path / "packed"), backend="dequant")
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-4)


def test_group_size_that_no_longer_divides_is_refused():
    """96 kept channels are not a multiple of 64: the plan made after pruning refuses the grid."""
    w4 = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 64}
    with pytest.raises(llmpress.errors.UserError, match="group"):
        _pruned("llama", extra=[stage("rtn", weights=w4)])


def test_sliced_then_quantized_saves_packed(tmp_path):
    """SliceGPT (hidden 64 -> 48, head untied) then RTN W4 g16: the packed checkpoint has the
    smaller hidden size and serves the in-memory model's logits."""
    tok = tiny_tokenizer()
    m = TINY_MODELS["llama"](layers=2, vocab=len(tok))
    w4 = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 16}
    report = llmpress.compress(
        m, [stage("slicegpt", fraction=0.25), stage("rtn", weights=w4)], data=random_windows(8, 32, vocab=len(tok)), engine=QUIET
    )
    assert report.result.records["model.layers.0.self_attn.q_proj"].in_features == 48
    ids = random_windows(2, 32, vocab=len(tok), seed=7)
    want = logits(m, ids)
    save(m, tok, tmp_path / "packed", report=report)
    cfg = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["tie_word_embeddings"]) == (48, False)
    loaded, _ = load_compressed(str(tmp_path / "packed"), backend="dequant")
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-4)


def test_slice_share_that_the_head_count_does_not_divide_saves(tmp_path):
    """20% of 64 is 12.8 channels: 51 kept would be computed and then refused by transformers'
    config check (4 heads); the kept size is rounded to a multiple of the heads (52) and the
    HF folder loads in plain transformers with the in-memory logits."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    m = TINY_MODELS["llama"](layers=2, vocab=len(tok))
    report = llmpress.compress(m, [stage("slicegpt", fraction=0.2)], data=random_windows(8, 32, vocab=len(tok)), engine=QUIET)
    assert report.stages["stage0:slicegpt"]["hidden_after"] == 52
    ids = random_windows(2, 32, vocab=len(tok), seed=7)
    save(m, tok, tmp_path / "hf", report=report, format="hf-fakequant")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(logits(plain, ids), logits(m, ids), rtol=0, atol=1e-4)
