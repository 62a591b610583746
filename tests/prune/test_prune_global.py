"""prune_width allocation: global (one ranking over all blocks, blocks of their own sizes):
the budget, where it goes, the packed checkpoint of a model whose blocks differ, the refused
HF folder, composing with a quantizer, and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_MODELS, random_windows, tiny_llama, tiny_tokenizer
from helpers import QUIET, logits

import llmpress
from llmpress import stage
from llmpress.checkpoint import load_compressed, save
from llmpress.errors import RecipeError, UserError
from llmpress.export.packed_size import packed_model_size
from llmpress.prune.allocation import global_removals, unit_costs
from llmpress.prune.prune_width import PruneWidth

CALIB = random_windows(8, 32)
IDS = random_windows(2, 32, seed=5)


def _plant_mlp(m, block: int = 1, channels: int = 64, factor: float = 0.05):
    """Channels 0..channels-1 of ``block`` made unimportant (their gate/up rows and down
    columns scaled by ``factor``)."""
    mlp = m.model.layers[block].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[:channels] *= factor
        mlp.up_proj.weight[:channels] *= factor
        mlp.down_proj.weight[:, :channels] *= factor
    return m


def _prune(model, stages):
    return llmpress.compress(model, stages, data=CALIB, engine=QUIET)


def test_normalized_allocation_ignores_a_block_scale_and_keeps_its_shape():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(16, generator=g) + 0.5, torch.rand(16, generator=g) + 0.5
    base = global_removals([unit_costs(a), unit_costs(b)], 0.25, 0.9, "c")
    assert sum(base) == 8
    assert global_removals([unit_costs(a), unit_costs(10 * b)], 0.25, 0.9, "c") == base  # a block's scale: no effect
    assert global_removals([torch.sort(a).values, torch.sort(10 * b).values], 0.25, 0.9, "c") == [8, 0]  # raw scores: all from a
    peaked = b.clone()
    peaked[:4] *= 20  # importance concentrated in 4 structures: the other 12 sit far below the block's mean
    assert global_removals([unit_costs(a), unit_costs(peaked)], 0.25, 0.9, "c")[1] > base[1]
    assert unit_costs(torch.tensor([4.0, 1, 3, 0]), 2).tolist() == [0.5, 3.5]  # runs of 2 of the ascending scores / mean 2
    assert unit_costs(torch.tensor([[1.0, 3.0], [0.0, 0.0]])).tolist() == [1.0, 3.0]  # the r-th lowest of each group
    with pytest.raises(UserError, match="only 4 can go"):
        global_removals([torch.zeros(4), torch.zeros(4)], 0.75, 0.5, "c")  # 6 needed, at most 2 per block


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_global_mlp_spends_the_budget_where_the_scores_are_low(family):
    m = _plant_mlp(TINY_MODELS[family](layers=3))
    zeroed = copy.deepcopy(m)
    report = _prune(m, stage("prune_width", structure="mlp", ratio=0.25, allocation="global", update=False))
    s = report.stages["stage0:prune_width"]
    counts = [len(s["removed"][i]) for i in range(3)]
    assert sum(counts) == round(0.25 * 3 * 128) == 96  # the budget, exactly
    assert set(range(64)) <= set(s["removed"][1]) and counts[1] >= 64  # the planted channels go first
    assert len(set(counts)) > 1 and s["after"] == [128 - c for c in counts]
    sizes = [blk.mlp.down_proj.in_features for blk in m.model.layers]
    assert sizes == s["after"] and m.config.intermediate_size == max(sizes)
    for i, blk in enumerate(m.model.layers):
        assert blk.mlp.up_proj.out_features == blk.mlp.gate_proj.out_features == sizes[i]
        with torch.no_grad():
            zeroed.model.layers[i].mlp.down_proj.weight[:, s["removed"][i]] = 0
    torch.testing.assert_close(logits(m, IDS), logits(zeroed, IDS), rtol=0, atol=1e-5)


def _gqa_llama(layers: int = 3):
    """A tiny llama with 4 key/value groups of 2 query heads (head_dim 8)."""
    from transformers import LlamaForCausalLM

    cfg = tiny_llama(layers=layers).config
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 8, 4, 8
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_global_heads_remove_the_planted_groups_and_the_cache_follows():
    m = _gqa_llama()
    attn = m.model.layers[0].self_attn
    with torch.no_grad():  # kv groups 0 and 1 of block 0 (query heads 0-3, kv heads 0-1) made unimportant
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight[: (32 if lin is attn.q_proj else 16)] *= 0.05
        attn.o_proj.weight[:, :32] *= 0.05
    zeroed = copy.deepcopy(m)
    s = _prune(m, stage("prune_width", structure="heads", ratio=0.25, allocation="global", update=False)).stages["stage0:prune_width"]
    assert s["removed"][0][:4] == [0, 1, 2, 3]
    kv = [blk.self_attn.k_proj.out_features // 8 for blk in m.model.layers]
    assert sum(4 - k for k in kv) == 3 and kv[0] == 2 and len(set(kv)) > 1
    assert m.config.num_key_value_heads == max(kv) and m.config.num_attention_heads == 2 * max(kv)
    for i, blk in enumerate(m.model.layers):
        assert blk.self_attn.q_proj.out_features == 16 * kv[i] and blk.self_attn.num_key_value_groups == 2
        with torch.no_grad():
            for h in s["removed"][i]:
                zeroed.model.layers[i].self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
    want = logits(zeroed, IDS)
    torch.testing.assert_close(logits(m, IDS), want, rtol=0, atol=1e-5)
    with torch.no_grad():  # each block's KV cache holds its own number of kv heads
        out = m(input_ids=IDS[:, :24], use_cache=True)
        step = m(input_ids=IDS[:, 24:], past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, want[:, 24:], rtol=0, atol=1e-4)


def test_global_query_heads_keep_the_grouping():
    m = _gqa_llama()
    s = _prune(m, stage("prune_width", structure="query_heads", ratio=0.5, allocation="global", max_ratio=0.5)).stages["stage0:prune_width"]
    heads = [blk.self_attn.q_proj.out_features // 8 for blk in m.model.layers]
    assert sum(8 - h for h in heads) == 12 and all(h == 4 for h in heads)  # 2 per group, at most half: one per group each
    assert all(blk.self_attn.k_proj.out_features == 32 for blk in m.model.layers)
    assert s["after"] == {"heads": 4, "kv_heads": 4}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_packed_checkpoint_of_blocks_of_their_own_sizes(tmp_path, family):
    tok = tiny_tokenizer()
    m = _plant_mlp(TINY_MODELS[family](layers=3, vocab=len(tok)))
    with torch.no_grad():  # block 2's attention made unimportant: it loses its heads first
        m.model.layers[2].self_attn.o_proj.weight *= 0.01
    stages = [
        stage("prune_width", structure="mlp", ratio=0.25, allocation="global"),
        stage("prune_width", structure="heads", ratio=0.34, allocation="global", max_ratio=0.5),
    ]
    report = llmpress.compress(m, stages, data=random_windows(8, 32, vocab=len(tok)), engine=QUIET)
    ids = random_windows(2, 32, vocab=len(tok), seed=7)
    want = logits(m, ids)
    sizes = [(b.mlp.down_proj.in_features, b.self_attn.k_proj.out_features // 16) for b in m.model.layers]
    assert sum(128 - s[0] for s in sizes) == 96 and sizes[1][0] <= 64 and len({s[0] for s in sizes}) == 3  # (110, 64, 114) seeded
    assert sum(s[1] for s in sizes) == 4 and sizes[2][1] == 1  # 2 of 6 kv groups, one of them block 2's

    save(m, tok, tmp_path / "packed", report=report)
    meta = json.loads((tmp_path / "packed" / "llmpress.json").read_text())
    assert meta["format"] == "llmpress-packed-v4"
    got = [(b["intermediate_size"], b["num_key_value_heads"], b["num_attention_heads"]) for b in meta["structure"]["block_sizes"]]
    assert got == [(i, kv, 2 * kv) for i, kv in sizes]
    loaded, _ = load_compressed(str(tmp_path / "packed"))
    assert [b.mlp.down_proj.in_features for b in loaded.model.layers] == [s[0] for s in sizes]
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-5)
    assert packed_model_size(loaded)["n_params"] == sum(p.numel() for p in m.parameters())  # counted at each block's size
    with torch.no_grad():
        out = loaded(input_ids=ids[:, :24], use_cache=True)
        step = loaded(input_ids=ids[:, 24:], past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, want[:, 24:], rtol=0, atol=1e-4)

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match="hf-fakequant cannot store decoder blocks of different sizes.*packed format"):
        save(m, tok, tmp_path / "hf", report=report, format="hf-fakequant")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a temporary folder
    with pytest.raises(UserError, match="per-block sizes"):  # nor exported to a format of one size per model
        from llmpress.export.source import exportable_manifest

        exportable_manifest(tmp_path / "packed", "GGUF", "test")


def test_packed_block_sizes_are_checked(tmp_path):
    m = _plant_mlp(tiny_llama(layers=3))
    report = _prune(m, stage("prune_width", structure="mlp", ratio=0.25, allocation="global"))
    save(m, None, tmp_path / "p", report=report)
    path = tmp_path / "p" / "llmpress.json"
    meta = json.loads(path.read_text())
    meta["structure"]["block_sizes"][0]["intermediate_size"] = 999
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="block 0 sizes .* exceed the config"):
        load_compressed(str(tmp_path / "p"))
    meta["structure"]["block_sizes"] = meta["structure"]["block_sizes"][:2]
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="block sizes for 2 blocks, the config has 3"):
        load_compressed(str(tmp_path / "p"))


def test_global_pruning_then_gptq_w4_saves_packed(tmp_path):
    tok = tiny_tokenizer()
    m = _plant_mlp(tiny_llama(layers=3, vocab=len(tok)))
    w4 = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 32}
    stages = [
        stage("prune_width", structure="mlp", ratio=0.25, allocation="global", multiple_of=32),
        stage("gptq", weights=w4, ignore=["lm_head"]),
    ]
    report = llmpress.compress(m, stages, data=random_windows(8, 32, vocab=len(tok)), engine=QUIET)
    recs = report.result.records
    downs = [recs[f"model.layers.{i}.mlp.down_proj"].in_features for i in range(3)]
    assert sum(128 - d for d in downs) == 96 and all(d % 32 == 0 for d in downs) and len(set(downs)) > 1
    assert all(r.weight_args.bits == 4 for r in recs.values()) and len(recs) == 3 * 7
    ids = random_windows(2, 32, vocab=len(tok), seed=7)
    want = logits(m, ids)
    save(m, tok, tmp_path / "packed", report=report)
    loaded, _ = load_compressed(str(tmp_path / "packed"), backend="dequant")
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["quarot", "duquant", "spinquant"])
def test_rotations_refuse_blocks_of_their_own_sizes(method):
    m = _plant_mlp(tiny_llama(layers=3))
    with pytest.raises(UserError, match=f"{method} needs decoder blocks of one size"):
        _prune(m, [stage("prune_width", ratio=0.25, allocation="global"), stage(method)])


def test_bad_input():
    with pytest.raises(RecipeError, match="allocation='best'"):
        PruneWidth(allocation="best")
    for bad in (0.0, 1.0, 1.5, -0.1, "x"):
        with pytest.raises(RecipeError, match="max_ratio"):
            PruneWidth(allocation="global", max_ratio=bad)
    with pytest.raises(RecipeError, match="global only"):
        PruneWidth(max_ratio=0.5)
    with pytest.raises(RecipeError, match="above max_ratio"):
        PruneWidth(allocation="global", ratio=0.6, max_ratio=0.5)
    with pytest.raises(RecipeError, match="allocation"):
        llmpress.recipe.Recipe.from_dict({"stages": [{"method": "prune_width", "allocation": "per-layer"}]})
    m = tiny_llama(layers=2)
    with pytest.raises(UserError, match="only 2 can go"):  # 2 kv groups per block, never both: 3 of 4 cannot go
        llmpress.api.validate(
            m, llmpress.recipe.Recipe.from_dict({"stages": [{"method": "prune_width", "structure": "heads", "ratio": 0.75, "allocation": "global"}]})
        )
    with pytest.raises(UserError, match="not a multiple of 96"):
        llmpress.api.validate(m, llmpress.recipe.Recipe.from_dict({"stages": [{"method": "prune_width", "allocation": "global", "multiple_of": 96}]}))
    assert m.model.layers[0].self_attn.k_proj.out_features == 32  # nothing ran
    from llmpress.export.runtime_state import check_save_format

    rec = llmpress.recipe.Recipe.from_dict({"stages": [{"method": "prune_width", "allocation": "global"}]})
    with pytest.raises(UserError, match="hf-fakequant cannot store decoder blocks of different sizes .*stage 0.*packed format"):
        check_save_format(rec, "hf-fakequant")
    check_save_format(rec, "packed")
