"""OWL: per-block sparsity offsets from the outlier ratio of Wanda scores."""

from __future__ import annotations

import pytest
import torch
from conftest import random_windows, tiny_llama
from helpers import QUIET

import llmpress
from llmpress import stage
from llmpress.errors import RecipeError
from llmpress.prune.owl import OWL, effective_sparsity, outlier_ratio, owl_offsets


def test_offsets_keep_the_mean_and_spread():
    off = owl_offsets([0.01, 0.03, 0.02, 0.05], lam=0.1)
    assert sum(off) == pytest.approx(0.0, abs=1e-12)
    assert max(off) - min(off) == pytest.approx(0.2)
    assert off[3] == min(off) and off[0] == max(off)  # most outliers: pruned least
    assert owl_offsets([0.02, 0.02], 0.1) == [0.0, 0.0]


def test_outlier_ratio_counts_entries_above_m_means():
    s = torch.ones(100)
    s[:3] = 1000.0  # mean ~31: only the planted entries pass 5 x mean
    assert outlier_ratio([s[:50], s[50:]], 5.0) == pytest.approx(0.03)


def test_effective_sparsity_clips_and_ignores_nm():
    assert effective_sparsity(0.5) == 0.5
    assert effective_sparsity(0.5, -0.08) == pytest.approx(0.42)
    assert effective_sparsity(0.5, -0.08, m=4) == 0.5
    assert effective_sparsity(0.5, 0.7) == 0.99
    assert effective_sparsity(0.05, -0.08) == 0.0


def test_config_errors():
    with pytest.raises(RecipeError, match="lam"):
        OWL(lam=0.6)
    with pytest.raises(RecipeError, match="m="):
        OWL(m=0)


@pytest.mark.parametrize("pruner", ["wanda", "magnitude"])
def test_block_with_planted_outliers_is_pruned_less(pruner):
    m = tiny_llama(layers=4)
    with torch.no_grad():  # block 2: a few heavy input columns in every linear
        for mod in m.model.layers[2].modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight[:, :2] *= 40.0
    data = random_windows(8, 32)
    kw = {"per_row": True} if pruner == "magnitude" else {}
    report = llmpress.compress(m, [stage("owl", lam=0.1, windows=8), stage(pruner, sparsity=0.5, **kw)], data=data, engine=QUIET)
    rec = report.result.records
    per_block = [
        sum(r.sparsity * r.n_params for n, r in rec.items() if f"layers.{i}." in n) / sum(r.n_params for n, r in rec.items() if f"layers.{i}." in n)
        for i in range(4)
    ]
    assert min(per_block) == per_block[2] and per_block[2] < 0.45  # the outlier block keeps more
    assert max(per_block) - min(per_block) == pytest.approx(0.2, abs=0.02)
    total = sum(r.sparsity * r.n_params for r in rec.values()) / sum(r.n_params for r in rec.values())
    assert total == pytest.approx(0.5, abs=0.01)
    assert set(report.stages["stage0:owl"]["outlier_ratio"]) == {0, 1, 2, 3}
    assert report.to_dict()["stages"]["stage0:owl"]["sparsity_offset"] == report.stages["stage0:owl"]["sparsity_offset"]
    assert not [k for mod in m.modules() for k in vars(mod) if k.startswith("llmpress")]  # nothing left on the modules
