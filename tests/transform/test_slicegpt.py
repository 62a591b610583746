"""SliceGPT with one residual rotation: exact with nothing sliced, exact when the sliced
directions are empty, a smaller hidden size that plain transformers loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama, tiny_tokenizer
from helpers import QUIET, logits, rel_max_err

import llmpress
from llmpress import stage
from llmpress.checkpoint import save
from llmpress.errors import RecipeError, UserError
from llmpress.transform.slicegpt import SliceGPT

CALIB = random_windows(8, 32)
IDS = random_windows(2, 32, seed=9)


def _slice(model, **kw):
    return llmpress.compress(model, stage("slicegpt", **kw), data=CALIB, engine=QUIET).stages["stage0:slicegpt"]


def test_nothing_sliced_equals_the_unrotated_model():
    m = tiny_llama(layers=2)
    with torch.no_grad():  # norm gains other than 1, so their fusion matters
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.2)
    want = logits(m, IDS)
    s = _slice(m, fraction=0.0)
    assert s["hidden_after"] == 64 and s["variance_kept"] == pytest.approx(1.0)
    assert rel_max_err(logits(m, IDS), want) < 1e-5
    assert not torch.allclose(m.model.embed_tokens.weight, tiny_llama(layers=2).model.embed_tokens.weight)  # it was rotated


def _stream_in_48_dims(m):
    """Residual stream confined to channels 0..47: embeddings and writers leave 48..63 at zero."""
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 48:] = 0  # tied: the head reads only 0..47 too
        for b in m.model.layers:
            b.self_attn.o_proj.weight[48:] = 0
            b.mlp.down_proj.weight[48:] = 0


def test_slicing_directions_without_variance_is_exact(tmp_path):
    m = tiny_llama(layers=2, vocab=len(tiny_tokenizer()))
    _stream_in_48_dims(m)
    ids = random_windows(2, 32, vocab=len(tiny_tokenizer()), seed=9)
    want = logits(m, ids)
    s = _slice(m, fraction=0.25)
    assert (s["hidden_before"], s["hidden_after"]) == (64, 48) and s["variance_kept"] == pytest.approx(1.0)
    assert m.config.hidden_size == 48 and m.model.layers[0].self_attn.q_proj.weight.shape == (64, 48)
    assert m.lm_head.weight.shape == (len(tiny_tokenizer()), 48) and m.model.norm.weight.shape == (48,)
    got = logits(m, ids)
    assert rel_max_err(got, want) < 1e-5
    from transformers import AutoModelForCausalLM

    save(m, tiny_tokenizer(), tmp_path / "hf", format="hf-fakequant")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["head_dim"], cfg["tie_word_embeddings"]) == (48, 16, False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(plain, ids), got, rtol=0, atol=1e-5)


def test_slicing_keeps_the_top_components_and_composes_with_rtn():
    m = tiny_llama(layers=2)
    ref = copy.deepcopy(m)
    report = llmpress.compress(m, [stage("slicegpt", fraction=0.25, multiple_of=16), stage("rtn", weights={"bits": 8, "granularity": "channel"})],
                               data=CALIB, engine=QUIET)  # fmt: skip
    s = report.stages["stage0:slicegpt"]
    assert s["hidden_after"] == 48 and 0.75 < s["variance_kept"] < 1.0  # a random model's stream: close to isotropic
    assert report.result.records["model.layers.0.mlp.gate_proj"].in_features == 48
    err = rel_max_err(logits(m, IDS), logits(ref, IDS))
    assert 0 < err < 1.0


def test_errors():
    with pytest.raises(RecipeError, match="fraction"):
        SliceGPT(fraction=1.0)
    with pytest.raises(RecipeError, match="keeps none"):
        SliceGPT(fraction=0.2, multiple_of=128).kept(64)
    assert SliceGPT(fraction=0.25, multiple_of=32).kept(576) == 448
    # SmolLM2 (9 heads): the kept size is a multiple of the head count too (transformers' config check)
    assert SliceGPT(fraction=0.2).kept(576, 9) == 459 and SliceGPT(fraction=0.25).kept(576, 9) == 432
    assert SliceGPT(fraction=0.2, multiple_of=2).kept(576, 9) == 468  # nearest multiple of 18 to 460.8
    with pytest.raises(RecipeError, match="slices nothing"):
        SliceGPT(fraction=0.25, multiple_of=32).kept(576, 9)  # steps of 288: 432 rounds back to 576
    with pytest.raises(UserError, match="post"):
        _slice(tiny_gemma3(layers=2), fraction=0.25)
