"""Wanda and magnitude pruning: scores, exact per-row / N:M masks, methods end to end."""

import pytest
import torch
from conftest import random_windows, tiny_llama

from llmpress import compress, stage
from llmpress.errors import RecipeError
from llmpress.prune.magnitude import Magnitude  # noqa: F401  (registers "magnitude")
from llmpress.prune.masks import is_nm, magnitude_prune
from llmpress.prune.wanda import wanda_mask, wanda_scores


def test_wanda_scores_formula():
    w = torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.0, 4.0]])
    norms = torch.tensor([2.0, 1.0, 0.1])
    assert torch.allclose(wanda_scores(w, norms), torch.tensor([[2.0, 2.0, 0.3], [1.0, 0.0, 0.4]]))


def test_wanda_mask_per_row_exact():
    torch.manual_seed(0)
    w, norms = torch.randn(6, 40), torch.rand(40) * 5
    mask = wanda_mask(w, norms, 0.5)
    assert (mask.sum(1) == 20).all()
    s = wanda_scores(w, norms)
    # every pruned score of a row is <= every kept score of that row
    for r in range(6):
        assert s[r][mask[r]].max() <= s[r][~mask[r]].min()
    # the paper's example: with a large input norm the small weight survives
    w2 = torch.tensor([[1.0, 0.2]])
    assert wanda_mask(w2, torch.tensor([1.0, 10.0]), 0.5).tolist() == [[True, False]]
    assert magnitude_prune(w2, 0.5).tolist() == [[1.0, 0.0]]


def test_wanda_nm_exact():
    torch.manual_seed(1)
    w, norms = torch.randn(5, 32), torch.rand(32)
    mask = wanda_mask(w, norms, n=2, m=4)
    assert (mask.reshape(5, 8, 4).sum(-1) == 2).all()
    s = wanda_scores(w, norms).reshape(5, 8, 4)
    mg = mask.reshape(5, 8, 4)
    kept_min = s.masked_fill(mg, float("inf")).amin(-1)
    pruned_max = s.masked_fill(~mg, -float("inf")).amax(-1)
    assert (pruned_max <= kept_min).all()
    assert is_nm(w.masked_fill(mask, 0), 2, 4)


def test_uniform_norms_equal_magnitude():
    torch.manual_seed(2)
    w = torch.randn(4, 16)
    mask = wanda_mask(w, torch.full((16,), 3.0), 0.25)
    assert torch.equal(w.masked_fill(mask, 0), magnitude_prune(w, 0.25))


@pytest.mark.parametrize(
    "cfg,check",
    [
        (dict(sparsity=0.5), lambda w: abs(float((w == 0).float().mean()) - 0.5) < 1e-6),
        (dict(n=2, m=4), lambda w: is_nm(w, 2, 4)),
    ],
)
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_pruning_methods_end_to_end(method, cfg, check):
    m = tiny_llama()
    rep = compress(m, [stage(method, **cfg)], random_windows(8, 24) if method == "wanda" else None)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = m.get_submodule(name).weight
        assert check(w)
        assert abs(rep.layers[name]["sparsity"] - 0.5) < 1e-6
    assert rep.layers["model.layers.0.mlp.up_proj"]["methods"] == [method]


def test_magnitude_per_layer_and_config_errors():
    m = tiny_llama()
    compress(m, [stage("magnitude", sparsity=0.3, per_row=False)])
    w = m.model.layers[0].mlp.up_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.3) < 1e-3
    with pytest.raises(RecipeError):
        stage("wanda", sparsity=1.0)
    with pytest.raises(RecipeError):
        stage("wanda", n=4, m=4)
