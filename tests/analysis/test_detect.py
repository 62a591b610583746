"""Detectors on synthetic matrices: planted outliers are found exactly, Gaussian noise gives none."""

import pytest
import torch

from llmpress.analysis import detect
from llmpress.analysis.collect import SiteStats
from llmpress.errors import UserError


def gauss(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ massive activations


def test_massive_planted_found_exactly():
    a = gauss(64, 128)
    a[0, 17] = 500.0
    a[5, 3] = -400.0  # magnitudes count, whatever the sign
    found = detect.massive_activations(a)
    assert [(t, c) for t, c, _ in found] == [(0, 17), (5, 3)]
    assert found[0][2] == 500.0 and found[1][2] == -400.0


def test_massive_none_on_gaussian_and_gamma_floor():
    assert detect.massive_activations(gauss(64, 128)) == []
    # tiny tensor: 300 x mean is small, but gamma=50 still applies
    a = torch.full((64, 128), 1e-3)
    a[1, 1] = 40.0
    assert detect.massive_activations(a) == []
    assert detect.massive_activations(a, gamma=10.0) == [(1, 1, 40.0)]


def test_massive_mask_batched_uses_each_sequence_mean():
    a = gauss(2, 32, 64)
    a[1] *= 100  # sequence 1 has a much larger mean |A|
    a[0, 3, 4] = 800.0
    a[1, 3, 4] = 800.0  # not 300x the mean of sequence 1
    m = detect.massive_mask(a)
    assert m[0].nonzero().tolist() == [[3, 4]]
    assert not m[1].any()


def test_sun_rule():
    a = gauss(64, 128)
    a[0, 9] = 2000.0  # ~3000x the median |A| (~0.67)
    a[7, 2] = 150.0  # > 100 but only ~220x the median
    m = detect.sun_mask(a)
    assert m.nonzero().tolist() == [[0, 9]]
    assert not detect.sun_mask(gauss(64, 128)).any()


# ------------------------------------------------------------------ channel-wise outliers


def test_channel_outliers_planted_found_exactly():
    a = gauss(256, 64)
    a[:, 9] = 8.0 + 0.1 * gauss(256, seed=1)
    a[:, 40] = -9.0 + 0.1 * gauss(256, seed=2)
    a[:, 20] = 8.0 + 2.0 * gauss(256, seed=3)  # large mean but not consistent: std >= beta
    mask = detect.channel_outliers(a)
    assert mask.nonzero().flatten().tolist() == [9, 40]


def test_channel_outliers_none_on_gaussian_and_batched():
    assert not detect.channel_outliers(gauss(256, 64)).any()
    a = gauss(3, 128, 32)
    a[1, :, 5] = 10.0
    m = detect.channel_outliers(a)
    assert m.shape == (3, 32)
    assert m.nonzero().tolist() == [[1, 5]]


# ------------------------------------------------------------------ LLM.int8() features


def test_int8_features_planted():
    layers, T, C = 8, 200, 32
    hs = [gauss(T, C, seed=s) for s in range(layers)]
    for li in (1, 4, 6):  # 3/8 = 37.5% of the layers, 10% of the positions
        hs[li][:20, 5] = 7.0
    hs[2][:50, 9] = 7.0  # one layer only: 12.5% < 25%
    for li in range(layers):  # every layer but a single position: 0.5% < 6%
        hs[li][3, 11] = -7.0
    assert detect.int8_outlier_features(hs) == [5]
    tr = detect.Int8FeatureTracker(C)
    for li, h in enumerate(hs):
        tr.update(li, h)
    s = tr.summary()
    assert s["layer_frac"][5] == pytest.approx(3 / 8)
    assert s["seq_frac"][5] == pytest.approx(20 / T)
    assert s["layer_frac"][11] == 1.0 and s["seq_frac"][11] == pytest.approx(1 / T)
    assert tr.ranking()[:3] == [11, 5, 9] or set(tr.ranking()[:3]) == {5, 9, 11}


def test_int8_none_on_gaussian():
    assert detect.int8_outlier_features([gauss(2, 64, 32, seed=s) for s in range(6)]) == []


# ------------------------------------------------------------------ super weights


def test_super_weight_candidate_and_exclusion():
    x = gauss(6, 32) * 0.5
    x[2, 13] = 50.0
    w = gauss(16, 32, seed=1) * 0.05
    w[7, 13] = 20.0
    y = x @ w.T
    c = detect.super_weight_candidate(x, y, w)
    assert (c.token, c.row, c.col) == (2, 7, 13)
    assert c.share == pytest.approx(1.0, abs=0.05)
    c2 = detect.super_weight_candidate(x, y, w, exclude=[(7, 13)])
    assert c2.col != 13 and c2.row == 7
    with pytest.raises(UserError):
        detect.super_weight_candidate(x, y, w.T)


def test_spike():
    assert detect.spike([1.0, 2.0, 1.5, 500.0, 1.0]) == 3
    assert detect.spike([1.0, 2.0, 1.5, 3.0]) is None
    assert detect.spike([0.1, 0.2, 0.1, 30.0], min_abs=100.0) is None  # a spike, but too small


# ------------------------------------------------------------------ difficulty


def test_effective_levels_and_kurtosis():
    assert detect.effective_levels(torch.tensor([1.0, 2.0, 4.0])).tolist() == [64.0, 128.0, 256.0]
    g = gauss(200_000)
    assert detect.kurtosis(g) == pytest.approx(3.0, abs=0.1)
    x = g[:1000].double()
    k1 = detect.kurtosis(x)
    k2 = detect.kurtosis_from_moments(x.numel(), x.sum(), (x**2).sum(), (x**3).sum(), (x**4).sum())
    assert k1 == pytest.approx(k2)


def test_difficulty_flags_planted_outlier_channel():
    a = gauss(128, 64)
    flat = detect.difficulty(a)
    assert flat["eff_levels_median"] > 150 and flat["kurtosis"] == pytest.approx(3.0, abs=0.5)
    a[:, 7] *= 100
    d = detect.difficulty(a)
    assert d["eff_levels_median"] < 5 and d["frac_channels_under_16_levels"] > 0.9
    assert d["max_over_median"] > 300
    w = gauss(32, 16)
    w[3, 0] = 80.0  # weights: channels are output rows
    dw = detect.difficulty(w, channel_dim=0)
    assert dw["absmax"] == 80.0 and dw["eff_levels_median"] < 20


def test_thresholds_validate():
    with pytest.raises(UserError):
        detect.Thresholds(massive_eta=-1)
    with pytest.raises(UserError):
        detect.Thresholds(int8_layer_frac=1.5)
    assert detect.Thresholds().to_dict()["massive_eta"] == 300.0


# ------------------------------------------------------------------ the streaming summaries agree with the detectors


def test_site_stats_match_pure_detectors():
    x = gauss(3, 64, 48)
    x[:, 0, 5] = 900.0  # massive at token 0 of every sequence
    x[1, :, 30] = 7.0 + 0.05 * gauss(64, seed=4)  # channel-wise outlier in sequence 1
    st = SiteStats(48, 64, detect.DEFAULT)
    st.update(x[:2], 0)
    st.update(x[2:], 2)
    mm = detect.massive_mask(x)
    ents = st.massive_entries()
    assert {(e["pos"], e["channel"]) for e in ents} == {tuple(t) for t in mm.nonzero()[:, 1:].tolist()} == {(0, 5)}
    assert ents[0]["seqs"] == 3 and ents[0]["mean"] == pytest.approx(900.0)
    assert st.ch_outlier_seqs.tolist() == detect.channel_outliers(x).sum(0).tolist()
    flat = x.reshape(-1, 48)
    assert torch.allclose(st.channel_mean(), flat.mean(0), atol=1e-4)
    assert torch.allclose(st.channel_std(), flat.std(0, correction=0), atol=1e-3)
    assert torch.equal(st.ch_absmax, flat.abs().amax(0))
    assert st.top[0][1:] in [(0, 0, 5), (1, 0, 5), (2, 0, 5)]
    d, ref = st.difficulty(), detect.difficulty(flat)
    assert d["kurtosis"] == pytest.approx(ref["kurtosis"], rel=1e-4)
    assert d["eff_levels_median"] == pytest.approx(ref["eff_levels_median"])
    assert st.hist.sum() + st.zeros == x.numel()
