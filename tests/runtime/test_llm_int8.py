"""LLM.int8(): decomposition exactness, outlier detection and counters, recipe method."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import random_windows, tiny_llama
from helpers import rel_err

from llmpress import compress, stage
from llmpress.quant import QuantArgs, fake_quantize
from llmpress.runtime.int8 import weight_codes
from llmpress.runtime.llm_int8 import LLMInt8Linear, install_llm_int8, llm_int8_matmul, llm_int8_stats, reset_llm_int8_stats


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 32, generator=g)
    x[:, 5] *= 40  # an outlier feature, in every token
    x[3, 11] = -9.0  # a single outlier value: its whole column goes to float
    w = torch.randn(16, 32, generator=g) * 0.1
    return x, w


def test_threshold_zero_is_the_float_matmul():
    x, w = _data()
    codes, scale = weight_codes(w)
    y, cols = llm_int8_matmul(x, w, codes, scale, threshold=0.0)
    assert cols.all()
    assert torch.allclose(y, x @ w.t(), rtol=1e-6, atol=1e-6)


def test_no_outliers_is_vectorwise_int8():
    x, w = _data()
    codes, scale = weight_codes(w)
    y, cols = llm_int8_matmul(x, w, codes, scale, threshold=float("inf"))
    assert not cols.any()
    xq = fake_quantize(x, QuantArgs(bits=8, granularity="token"))
    wq = codes.float() * scale.unsqueeze(1)
    assert torch.allclose(y, xq @ wq.t(), rtol=1e-5, atol=1e-5)


def test_outlier_columns_detected_and_help():
    x, w = _data()
    codes, scale = weight_codes(w)
    y, cols = llm_int8_matmul(x, w, codes, scale, threshold=6.0)
    assert cols.nonzero().flatten().tolist() == [5, 11]
    ref = x @ w.t()
    y_all_int8, _ = llm_int8_matmul(x, w, codes, scale, threshold=float("inf"))
    assert (y - ref).norm() < 0.5 * (y_all_int8 - ref).norm()


def test_module_counters_and_float_outlier_weights():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    w0 = lin.weight.detach().clone()
    install_llm_int8(lin, threshold=0.0, outlier_weights="float")
    assert isinstance(lin, LLMInt8Linear) and torch.equal(lin.weight, w0)
    x, _ = _data()
    assert torch.allclose(lin(x.reshape(2, 12, 32)), F.linear(x, w0, lin.bias).reshape(2, 12, 16), atol=1e-5)
    lin.threshold = 6.0
    reset_llm_int8_stats(nn.Sequential(lin))
    lin(x)
    c = lin.counters
    assert c["calls"] == 1 and c["last_outlier_columns"] == 2 and abs(c["mean_outlier_share"] - 2 / 32) < 1e-9
    assert "weight" in lin.state_dict() and "int8_codes" not in lin.state_dict()


def test_llm_int8_recipe_records_live_counters():
    m = tiny_llama()
    ids = random_windows(2, 24, seed=4)
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    rep = compress(m, [stage("llm_int8", threshold=1.0)])
    name = "model.layers.0.mlp.down_proj"
    assert isinstance(m.get_submodule(name), LLMInt8Linear)
    assert rep.layers[name]["weights"] == QuantArgs(bits=8, granularity="channel").describe()
    with torch.no_grad():
        y = m(input_ids=ids).logits
    assert rel_err(y, ref) < 0.02
    stats = llm_int8_stats(m)
    assert len(stats) == 14 and stats[name]["calls"] == 1
    assert rep.layers[name]["llm_int8"]["calls"] == 1  # the report holds the live counters
    assert 0.0 <= stats[name]["mean_outlier_share"] <= 1.0
