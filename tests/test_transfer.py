"""Quality beyond the calibration text (issue 22): a channel the calibration text never
activates keeps round-to-nearest weights, so the error on text that does activate it stays
bounded by RTN's."""
from __future__ import annotations

import copy

import torch

from llmpress import QuantArgs, api, stage
from llmpress.quant.core import quantize_weight

from conftest import random_windows, tiny_llama

W4G16 = QuantArgs(bits=4, symmetric=True, granularity="group", group_size=16, observer="minmax")
DEAD = 5  # hidden channel planted dead for calibration


def _logit_error(model, ref, windows) -> float:
    with torch.no_grad():
        return float((model(windows).logits - ref(windows).logits).pow(2).mean())


def test_planted_dead_channel_keeps_out_of_domain_error_bounded():
    fp = tiny_llama(seed=3)
    planted = copy.deepcopy(fp)
    for layer in planted.model.layers:  # calibration text never lights channel DEAD at q/k/v and gate/up
        layer.input_layernorm.weight.data[DEAD] = 0.0
        layer.post_attention_layernorm.weight.data[DEAD] = 0.0
    api.compress(planted, [stage("gptq", weights=W4G16, act_order=True)], random_windows(n=16, seqlen=32, seed=1))
    rtn = copy.deepcopy(fp)
    api.compress(rtn, [stage("rtn", weights=W4G16)])
    gptq = copy.deepcopy(fp)  # the GPTQ weights on the real model, where the channel is alive
    zeroed = copy.deepcopy(fp)  # what zeroing dead columns (the GPTQ reference code) would give
    for name, mod in planted.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            w = gptq.get_submodule(name).weight.data
            w.copy_(mod.weight.data)
            ref, _ = quantize_weight(fp.get_submodule(name).weight.data, W4G16)
            assert torch.equal(w[:, DEAD], ref[:, DEAD]), name  # the dead column is RTN of the original
            zeroed.get_submodule(name).weight.data.copy_(w)
            zeroed.get_submodule(name).weight.data[:, DEAD] = 0.0
    test = random_windows(n=8, seqlen=32, seed=9)
    err_gptq, err_rtn, err_zeroed = (_logit_error(m, fp, test) for m in (gptq, rtn, zeroed))
    assert err_gptq < 2.0 * err_rtn
    assert err_zeroed > 2.0 * err_gptq
