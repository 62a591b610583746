import pytest
import torch
from conftest import TINY_MODELS, random_windows, tiny_llama
from helpers import logits, rel_err

from llmpress import compress, stage
from llmpress.errors import UserError
from llmpress.quant import QuantArgs
from llmpress.runtime.kv_quant import IMPL, detach_attention_runtime


@pytest.fixture
def spy(monkeypatch):
    """Record the keys/values the inner (sdpa) attention receives."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"]
    seen = []

    def wrapped(module, q, k, v, mask, **kw):
        seen.append((q.detach(), k.detach(), v.detach()))
        return inner(module, q, k, v, mask, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", wrapped)
    return seen


@pytest.mark.parametrize("family", TINY_MODELS)
def test_keys_and_values_on_a_4bit_grid_per_head_and_token(family, spy):
    m = TINY_MODELS[family]()
    ids = random_windows(2, 16)
    compress(m, [stage("quarot"), stage("kv_quant")], data=ids)
    assert m.config._attn_implementation != IMPL  # the model-level config (masks) is untouched
    assert m.model.layers[0].self_attn.config._attn_implementation == IMPL
    spy.clear()
    logits(m, ids)
    assert len(spy) == len(m.model.layers)
    for _q, k, v in spy:
        for t in (k, v):  # [batch, kv_heads, seq, head_dim]
            rows = t.reshape(-1, t.shape[-1])
            levels = torch.tensor([len(torch.unique(r)) for r in rows])
            assert levels.max() <= 16 and levels.min() >= 2


def test_keys_quantized_after_rope(spy):
    """Quantization sits after RoPE: position-dependent keys still lie on the grid."""
    m = tiny_llama()
    ids = random_windows(1, 32)
    compress(m, [stage("kv_quant", keys=QuantArgs(bits=3, symmetric=False, granularity="token"), values=None)], data=ids)
    spy.clear()
    logits(m, ids)
    _q, k, v = spy[0]
    assert max(len(torch.unique(r)) for r in k.reshape(-1, k.shape[-1])) <= 8
    assert max(len(torch.unique(r)) for r in v.reshape(-1, v.shape[-1])) > 8  # values untouched


@pytest.mark.parametrize("family", TINY_MODELS)
def test_incremental_decoding_matches_full_forward(family):
    """Per-token quantization: a cached decode step sees the same keys as a full forward."""
    m = TINY_MODELS[family]()
    ids = random_windows(1, 24)
    compress(m, [stage("quarot"), stage("kv_quant")], data=ids)
    with torch.no_grad():
        full = m(input_ids=ids, use_cache=False).logits[:, -1]
        out = m(input_ids=ids[:, :-1], use_cache=True)
        step = m(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    assert torch.allclose(step, full, atol=1e-4, rtol=1e-4)


def test_more_bits_less_error():
    ids = random_windows(2, 32)
    ref = logits(tiny_llama(), ids)
    errs = []
    for bits in (2, 4, 8):
        m = tiny_llama()
        a = QuantArgs(bits=bits, symmetric=False, granularity="token")
        compress(m, [stage("kv_quant", keys=a, values=a)], data=ids)
        errs.append(rel_err(logits(m, ids), ref))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-2


def test_group_size_must_divide_head_dim():
    m = tiny_llama()  # head_dim 16
    with pytest.raises(UserError, match="head_dim"):
        compress(m, [stage("kv_quant", keys=QuantArgs(bits=4, granularity="group", group_size=12))], data=random_windows(1, 8))


def test_detach_restores_the_attention():
    m = tiny_llama()
    ids = random_windows(1, 16)
    ref = logits(m, ids)
    compress(m, [stage("kv_quant")], data=ids)
    assert not torch.allclose(logits(m, ids), ref)
    for layer in m.model.layers:
        detach_attention_runtime(layer.self_attn)
        assert layer.self_attn.config is m.config
    assert torch.allclose(logits(m, ids), ref)
