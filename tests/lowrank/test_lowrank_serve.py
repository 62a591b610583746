"""Serving quantized low-rank factors: each factor through its grid's kernel (issue 16)."""

from __future__ import annotations

import torch
from conftest import random_windows, tiny_llama
from helpers import QUIET, logits

from llmpress import api, compress, load_compressed, stage
from llmpress.quant.args import QuantArgs
from llmpress.runtime.lowrank import LowRankLinear
from llmpress.runtime.qlinear import DequantLinear, LowbitInt4Linear

W4G32 = QuantArgs(bits=4, granularity="group", group_size=32)


def _buffer_bytes(mod: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in mod.buffers())


def _served(tmp_path, st):
    """(the compressed model's logits on two windows, the two windows, the checkpoint loaded
    with the kernels, loaded with backend="dequant")."""
    model = tiny_llama()
    ids = random_windows(8, 32)
    rep = compress(model, [st], data=ids, engine=QUIET)
    api.save(model, None, tmp_path / "c", report=rep)
    back, _ = load_compressed(str(tmp_path / "c"))
    exact, _ = load_compressed(str(tmp_path / "c"), backend="dequant")
    return logits(model, ids[:2]), ids[:2], back, exact


def test_w4_factors_run_the_int4_kernel_stay_4bit_in_memory_and_match(tmp_path, ext):
    expected, ids, back, exact = _served(tmp_path, stage("svd_llm", targets=["re:.*mlp\\..*_proj$"], rank=32, weights=W4G32))
    for name in ("gate_proj", "up_proj", "down_proj"):
        mod = getattr(back.model.layers[0].mlp, name)
        assert isinstance(mod, LowRankLinear) and mod.kernel == "lowrank/llmpress_int4_cpu"
        assert isinstance(mod.a, LowbitInt4Linear) and isinstance(mod.b, LowbitInt4Linear)
        m, n, r = mod.out_features, mod.in_features, mod.rank
        # 4-bit codes, a float32 scale and zero per 32 weights: 0.75 bytes a weight, not 4
        assert _buffer_bytes(mod) == (r * (m + n)) // 2 + 2 * 4 * (r * (m + n)) // 32
        ref = getattr(exact.model.layers[0].mlp, name)
        assert isinstance(ref.a, DequantLinear) and ref.kernel == "lowrank/dequant"
        assert torch.equal(mod.A, ref.A) and torch.equal(mod.B, ref.B)  # the same numbers, held packed
        x = torch.randn(3, n)
        for rows in (1, 3):
            assert torch.allclose(mod(x[:rows]), ref(x[:rows]), atol=1e-5, rtol=1e-5)
    assert torch.allclose(logits(back, ids), expected, atol=1e-4, rtol=1e-4)
    from llmpress.bench import _leaf_linears

    leaves = [n for n, _, _ in _leaf_linears(back)]  # what the serving benchmark times: a factored layer once, not its factors
    assert "model.layers.0.mlp.down_proj" in leaves and not any(n.endswith((".a", ".b")) for n in leaves)


def test_float_factors_stay_float_and_are_one_module_each():
    A, B = torch.randn(8, 4), torch.randn(4, 6)
    mod = LowRankLinear(A, B, bias=torch.ones(8))
    assert mod.kernel == "lowrank" and mod.A.data_ptr() == A.data_ptr()
    x = torch.randn(2, 6)
    assert torch.allclose(mod(x), x @ (A @ B).T + 1, atol=1e-6)
    assert torch.allclose(mod.expand(mod.latent(x)), mod(x))


def test_qsvd_w4_factors_share_one_b_module_and_decode_with_the_latent_cache(tmp_path, ext):
    from llmpress.runtime.latent_kv import LatentKVAttention

    expected, ids, latent, plain = _served(tmp_path, stage("qsvd", targets=["re:.*self_attn\\.(q|k|v)_proj$"], ratio=0.8, weights=W4G32))
    a = latent.model.layers[0].self_attn
    assert isinstance(a, LatentKVAttention)
    assert isinstance(a.q_proj.b, LowbitInt4Linear) and a.k_proj.b is a.q_proj.b and a.v_proj.b is a.q_proj.b
    assert a.q_proj.a is not a.k_proj.a
    assert torch.allclose(logits(latent, ids), expected, atol=1e-4, rtol=1e-4)
    for layer in plain.model.layers:  # exact factors, K and V cached as usual
        if isinstance(layer.self_attn, LatentKVAttention):
            layer.self_attn = layer.self_attn.attn
    prompt = random_windows(1, 12, seed=5)
    with torch.no_grad():
        outs = [m.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True) for m in (latent, plain)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert all(torch.allclose(x, y, atol=1e-4, rtol=1e-4) for x, y in zip(outs[0].logits, outs[1].logits))
