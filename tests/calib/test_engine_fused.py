"""The staged single-pass engine gives the same result as the grouped multi-pass one."""

import copy

import pytest
import torch
from conftest import random_windows, tiny_gemma3, tiny_llama

from llmpress import QuantArgs, compress, stage
from llmpress.calib.engine import EngineOptions


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("acts", [None, QuantArgs(bits=8, granularity="token")], ids=["w4", "w4a8"])
def test_fused_equals_grouped_true_sequential(make, acts):
    base = make()
    calib = random_windows(6, 24, seed=3)
    recipe = [stage("gptq", weights=QuantArgs(bits=4, group_size=32), activations=acts)]
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    compress(a, recipe, calib, engine=EngineOptions(batch_size=4, true_sequential=True, fused=True, progress=False))
    compress(b, recipe, calib, engine=EngineOptions(batch_size=4, true_sequential=True, fused=False, progress=False))
    changed = 0
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
        changed += not torch.equal(pa, dict(base.named_parameters())[n.replace(".linear.", ".")])
    assert changed == 14  # every block linear was quantized
    x = random_windows(2, 24, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, rtol=1e-4, atol=1e-4)
