"""Layer removal (ShortGPT): Block Influence, drop-one perplexity, removal with renumbering."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, random_windows, tiny_llama
from helpers import QUIET, logits

import llmpress
from llmpress import stage
from llmpress.errors import RecipeError, UserError
from llmpress.prune.drop_layers import DropLayers, least_important
from llmpress.prune.importance import block_influence, drop_one_perplexity, skipped
from llmpress.prune.structure import drop_blocks


def _plant_identity(model, i: int) -> None:
    """Block i adds nothing to the residual stream (its o_proj and down_proj write zeros)."""
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_block_influence_of_an_identity_block_is_zero(family):
    m = TINY_MODELS[family](layers=3)
    _plant_identity(m, 1)  # gemma3: its post-norms keep a zero sub-layer output zero
    bi = block_influence(m, llmpress.arch.get_arch(m), random_windows(4, 16), windows=4, batch_size=2)
    assert bi[1] == pytest.approx(0.0, abs=1e-6)
    assert min(bi[0], bi[2]) > 1e-3  # the random blocks do change the stream
    assert least_important(bi, 1) == [1]


def test_drop_one_perplexity_of_an_identity_block_is_the_full_models():
    m = tiny_llama(layers=3)
    _plant_identity(m, 2)
    base, ppl = drop_one_perplexity(m, llmpress.arch.get_arch(m), random_windows(4, 16), windows=4, batch_size=4)
    assert ppl[2] == pytest.approx(base, rel=1e-6)
    assert abs(ppl[0] - base) > 1e-3 * base and abs(ppl[1] - base) > 1e-3 * base


def test_least_important_picks_the_lowest_scores_in_order():
    assert least_important([0.3, 0.1, 0.5, 0.05], 2) == [1, 3]
    assert least_important([0.2, 0.2, 0.9], 1) == [1]  # a tie removes the later block
    assert least_important([0.1, 0.2], 0) == []


@pytest.mark.parametrize("family,layers,drop", [("llama", 4, [1, 2]), ("gemma3", 6, [0, 3])])
def test_removed_blocks_equal_the_model_with_them_skipped(family, layers, drop):
    """Logits without a KV cache and the cached decode both match the original with the blocks
    skipped; for gemma3 the kept blocks keep their sliding/full attention type (window 16 < 32 tokens)."""
    m = TINY_MODELS[family](layers=layers)
    ids = random_windows(2, 32)
    with skipped(m.model.layers[drop[0]]), skipped(m.model.layers[drop[1]]):
        want = logits(m, ids)
    types = list(getattr(m.config, "layer_types", None) or [])
    small = copy.deepcopy(m)
    keep = drop_blocks(small, llmpress.arch.get_arch(small), drop)
    assert keep == [i for i in range(layers) if i not in drop]
    assert small.config.num_hidden_layers == layers - 2 and len(small.model.layers) == layers - 2
    assert [b.self_attn.layer_idx for b in small.model.layers] == list(range(layers - 2))
    if types:
        assert small.config.layer_types == [types[i] for i in keep]
        assert "full_attention" in small.config.layer_types  # the full block (index 5) moved to index 3
    torch.testing.assert_close(logits(small, ids), want, rtol=0, atol=1e-5)
    with torch.no_grad():  # the KV cache files each kept block under its new index
        out = small(input_ids=ids[:, :24], use_cache=True)
        step = small(input_ids=ids[:, 24:], past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, want[:, 24:], rtol=0, atol=1e-4)


def test_compress_drops_the_planted_block_and_quantizes_the_rest():
    m = tiny_llama(layers=4)
    _plant_identity(m, 2)
    ref = copy.deepcopy(m)
    ids = random_windows(2, 32, seed=3)
    report = llmpress.compress(m, [stage("drop_layers", count=1), stage("rtn", weights={"bits": 8, "granularity": "channel"})],
                               data=random_windows(8, 32), engine=QUIET)  # fmt: skip
    summary = report.stages["stage0:drop_layers"]
    assert summary["removed"] == [2] and summary["blocks_after"] == 3
    assert m.config.num_hidden_layers == 3
    assert sorted({n.split(".")[2] for n in report.result.records if ".layers." in n}) == ["0", "1", "2"]
    assert report.compressed["n_params"] < llmpress.eval.size.model_size(ref)["n_params"]
    err = (logits(m, ids) - logits(ref, ids)).abs().max() / logits(ref, ids).abs().max()
    assert err < 0.05  # the removed block was the identity: only the 8-bit rounding remains


def test_config_and_removal_errors():
    with pytest.raises(RecipeError, match="fraction"):
        DropLayers(fraction=1.0)
    with pytest.raises(RecipeError, match="exactly one"):
        DropLayers()
    with pytest.raises(RecipeError, match="importance"):
        DropLayers(count=1, importance="random")
    assert DropLayers(fraction=0.2).n_removed(30) == 6
    with pytest.raises(UserError, match="leaves none"):
        DropLayers(count=2).n_removed(2)
    m = tiny_llama(layers=2)
    with pytest.raises(UserError, match="leaves none"):
        llmpress.compress(m, [stage("drop_layers", count=2)], data=random_windows(2, 16), engine=QUIET)
    assert len(m.model.layers) == 2  # refused before anything changed
    with pytest.raises(UserError, match="leaves none"):
        drop_blocks(m, llmpress.arch.get_arch(m), [0, 1])
    with pytest.raises(UserError, match="out of range"):
        drop_blocks(m, llmpress.arch.get_arch(m), [5])


def test_a_structural_stage_after_per_layer_settings_is_refused():
    """OWL's offsets name linears by block index: a block removed after it would shift them."""
    m = tiny_llama(layers=3)
    with pytest.raises(UserError, match="put it first"):
        llmpress.compress(
            m, [stage("owl", windows=2), stage("drop_layers", count=1), stage("wanda", sparsity=0.5)], data=random_windows(2, 16), engine=QUIET
        )
    assert len(m.model.layers) == 3
    report = llmpress.compress(
        m, [stage("drop_layers", count=1), stage("owl", windows=2), stage("wanda", sparsity=0.5)], data=random_windows(2, 16), engine=QUIET
    )
    assert set(report.stages["stage1:owl"]["sparsity_offset"]) == {0, 1}
