"""The analysis finds SmolLM2-135M's known outliers (slow: loads the packaged model)."""

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_massive_activation_and_super_weight():
    from llmpress import models
    from llmpress.analysis import AnalysisConfig, analyze

    model, tok = models.load("smollm2-135m")
    an = analyze(model, tok, AnalysisConfig(windows=2, seqlen=128, interventions=False, plots=False, progress=False))
    mf = an.summary["massive"]
    top = mf["top"]
    # residual channel 507 at token 0: ~2.4e4, ~1e4x the median |h|
    assert (top["pos"], top["channel"]) == (0, 507)
    assert 1.5e4 < abs(top["value"]) < 3.5e4
    assert top["ratio_to_median"] > 5e3
    pair = mf["pairs"][0]
    assert (pair["pos"], pair["channel"]) == (0, 507)
    # massive (eta/gamma rule) from layer 2-3 on (~700); at ~2.4e4 from the super weight's layer on
    assert mf["first_layer_eta_rule"] <= 3 and 2 in pair["layers"] and 3 in pair["layers"]
    assert all(abs(pair["by_layer"][str(li)]) > 1.5e4 for li in range(12, 27))
    # channels 17 and 247 are among the next ones
    assert {17, 247} <= set(mf["next_channels"][:4])
    # the super weight that makes it: layer 11 down_proj, row 507 (the channel), column 1229
    sw = an.summary["super_weights"]["super_weights"]
    assert (sw[0]["layer"], sw[0]["row"], sw[0]["col"]) == (11, 507, 1229)
    assert sw[0]["token"] == 0
