"""Width pruning: MLP channels and attention heads removed for real (smaller config)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, random_windows, tiny_llama
from helpers import QUIET, logits

import llmpress
from llmpress import stage
from llmpress.errors import RecipeError, UserError
from llmpress.prune.prune_width import PruneWidth, head_scores, kept_count, mlp_channel_scores, top
from llmpress.prune.structure import refit_columns

CALIB = random_windows(8, 32)


def _prune(model, **kw):
    report = llmpress.compress(model, stage("prune_width", **kw), data=CALIB, engine=QUIET)
    return report.stages["stage0:prune_width"]


def test_kept_count_and_top():
    assert kept_count(1536, 0.2, 1, "c") == 1229
    assert kept_count(1536, 0.2, 64, "c") == 1216  # 1228.8 -> nearest multiple of 64
    assert kept_count(3, 0.34, 1, "g") == 2
    with pytest.raises(UserError, match="removes every one"):
        kept_count(2, 0.8, 1, "groups")
    with pytest.raises(UserError, match="removes every one"):
        kept_count(128, 0.2, 256, "c")
    assert top(torch.tensor([0.5, 2.0, 1.0, 2.0]), 2).tolist() == [1, 3]


def test_scores_sum_wanda_over_the_structure():
    up = torch.tensor([[1.0, -2.0], [0.0, 1.0], [3.0, 0.0]])  # 3 channels, 2 inputs
    gate = torch.ones(3, 2)
    down = torch.tensor([[1.0, 0.0, -1.0], [1.0, 1.0, 0.0]])
    x_l2, h_l2 = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 10.0, 0.5])
    # up: [5, 2, 3]; gate: [3, 3, 3]; down column sums * h: [2, 10, 0.5]
    assert mlp_channel_scores(gate, up, down, x_l2, h_l2).tolist() == [10.0, 15.0, 6.5]
    q, kv = head_scores(torch.ones(4, 2), torch.ones(2, 2), torch.ones(2, 2), torch.ones(3, 4), torch.ones(2), torch.tensor([1.0, 1, 0, 0]), 2)
    assert q.tolist() == [4 + 6, 4 + 0] and kv.tolist() == [8.0]


def test_refit_columns():
    torch.manual_seed(0)
    x = torch.randn(200, 6, dtype=torch.float64)
    x[:, 5] = 0.5 * x[:, 0] - x[:, 2]  # input 5 is a combination of kept inputs: exactly recoverable
    w = torch.randn(4, 6, dtype=torch.float64)
    gram = x.T @ x
    keep = torch.tensor([0, 1, 2, 3, 4])
    w2 = refit_columns(w, gram, keep, damp=0.0)
    torch.testing.assert_close(x[:, keep] @ w2.T, x @ w.T)
    torch.testing.assert_close(refit_columns(w, gram, torch.arange(6), damp=0.01), w)  # nothing removed: unchanged


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_pruned_mlp_equals_the_model_with_those_channels_zeroed(family):
    m = TINY_MODELS[family](layers=2)
    zeroed = copy.deepcopy(m)
    s = _prune(m, structure="mlp", ratio=0.25, update=False)
    assert s["after"] == 96 and m.config.intermediate_size == 96
    for i, block in enumerate(m.model.layers):
        assert block.mlp.up_proj.weight.shape == (96, 64) and block.mlp.down_proj.weight.shape == (64, 96)
        assert len(s["removed"][i]) == 32
        with torch.no_grad():
            zeroed.model.layers[i].mlp.down_proj.weight[:, s["removed"][i]] = 0
    assert s["removed"][0] != s["removed"][1]  # each block its own channels, the same count
    ids = random_windows(2, 32, seed=5)
    torch.testing.assert_close(logits(m, ids), logits(zeroed, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("structure,heads,kv_heads", [("heads", 2, 1), ("query_heads", 2, 2)])
def test_pruned_heads_equal_the_model_with_those_heads_zeroed(family, structure, heads, kv_heads):
    m = TINY_MODELS[family](layers=2)
    zeroed = copy.deepcopy(m)
    s = _prune(m, structure=structure, ratio=0.5, update=False)
    cfg = m.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (heads, kv_heads, 16)
    for i, block in enumerate(m.model.layers):
        assert block.self_attn.q_proj.weight.shape == (heads * 16, 64) and block.self_attn.k_proj.weight.shape == (kv_heads * 16, 64)
        assert block.self_attn.o_proj.weight.shape == (64, heads * 16)
        if structure == "heads":  # a whole group: query heads 2g, 2g + 1 with kv head g
            assert s["removed"][i] in ([0, 1], [2, 3])
        else:  # one query head of each group
            assert len(s["removed"][i]) == 2 and {h // 2 for h in s["removed"][i]} == {0, 1}
        with torch.no_grad():
            for h in s["removed"][i]:
                zeroed.model.layers[i].self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
    ids = random_windows(2, 32, seed=5)
    want = logits(zeroed, ids)
    torch.testing.assert_close(logits(m, ids), want, rtol=0, atol=1e-5)
    with torch.no_grad():  # the KV cache holds the smaller number of kv heads
        out = m(input_ids=ids[:, :24], use_cache=True)
        step = m(input_ids=ids[:, 24:], past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, want[:, 24:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("structure", ["mlp", "heads"])
def test_update_refits_the_reader_closer_to_the_dense_model(structure):
    base = tiny_llama(layers=2)
    plain, refit = copy.deepcopy(base), copy.deepcopy(base)
    _prune(plain, structure=structure, ratio=0.5, update=False)
    _prune(refit, structure=structure, ratio=0.5, update=True)
    assert plain.config.intermediate_size == refit.config.intermediate_size
    want = logits(base, CALIB)
    err_plain = float((logits(plain, CALIB) - want).pow(2).mean())
    err_refit = float((logits(refit, CALIB) - want).pow(2).mean())
    assert err_refit < 0.8 * err_plain


def test_errors():
    with pytest.raises(RecipeError, match="ratio"):
        PruneWidth(ratio=1.0)
    with pytest.raises(RecipeError, match="structure"):
        PruneWidth(structure="experts")
    with pytest.raises(RecipeError, match="structure"):
        llmpress.recipe.Recipe.from_dict({"stages": [{"method": "prune_width", "structure": "experts"}]})
    m = tiny_llama(layers=2)
    with pytest.raises(UserError, match="removes every one"):  # 2 kv groups, round(1.6) = 2 removed
        _prune(m, structure="heads", ratio=0.8)
    assert m.config.num_key_value_heads == 2 and m.model.layers[0].self_attn.k_proj.weight.shape[0] == 32
    from transformers import LlamaForCausalLM

    cfg = tiny_llama(layers=2).config
    cfg.num_key_value_heads = 4  # every query head its own kv head: no query heads to take within a group
    mha = LlamaForCausalLM(cfg).eval()
    with pytest.raises(UserError, match="query_heads"):
        _prune(mha, structure="query_heads", ratio=0.5)
    no_mlp = tiny_llama(layers=2)
    no_mlp.model.layers[0].mlp.down_proj = torch.nn.Identity()
    with pytest.raises(UserError, match="needs mlp.down_proj"):
        _prune(no_mlp, structure="mlp", ratio=0.5)


@pytest.mark.parametrize(
    "family,st,match",
    [
        ("llama", {"method": "prune_width", "structure": "heads", "ratio": 0.8}, "removes every one"),
        ("llama", {"method": "drop_layers", "count": 2}, "leaves none"),
        ("gemma3", {"method": "slicegpt", "fraction": 0.25}, "post"),
        ("llama", {"method": "slicegpt", "fraction": 0.5, "multiple_of": 64}, "keeps none"),
    ],
)
def test_the_plan_refuses_before_anything_runs(family, st, match):
    """`validate` (what `llmpress compress` calls right after loading, before the baseline
    evaluation) runs each structural stage's own checks against the model."""
    m = TINY_MODELS[family](layers=2)
    with pytest.raises(UserError, match=match):
        llmpress.api.validate(m, llmpress.recipe.Recipe.from_dict({"stages": [st]}))
    # after a structural stage the next one's sizes are unknown until it ran: checked when it runs
    llmpress.api.validate(m, llmpress.recipe.Recipe.from_dict({"stages": [{"method": "prune_width", "ratio": 0.0}, st]}))
