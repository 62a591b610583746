"""KV-cache policies (llmpress.kvcache): equal to the dense cache when the budget covers the
sequence, KIVI's error bound and bytes, sinks' positions, H2O's choice, streaming evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from llmpress.errors import UserError
from llmpress.eval.kvstream import recompute_perplexity, stream_perplexity
from llmpress.kvcache import build_cache, parse_policy
from llmpress.kvcache.build import cache_bytes
from llmpress.kvcache.kivi import KIVIStore, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from llmpress.kvcache.layers import PolicyLayer
from llmpress.kvcache.rope import layer_inv_freqs, shift_keys


def _stream_logits(model, ids, spec, prefill=10):
    cache = build_cache(model, spec)
    out = [model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1), cache


@pytest.mark.parametrize(
    "spec",
    [
        "full",
        "sinks:4,100",
        "window:100",
        "h2o:50,50",
        "kivi:8,g16,r16",
        "kivi:8,g16,r16,s2",
        "sinks:2,80+kivi:8,g16,r16",
        "kivi:8,g16,r16,s2,pre",
        "sinks:2,80+kivi:8,g16,r16,pre",
    ],  # fmt: skip
)
def test_a_cache_whose_budget_covers_the_sequence_is_the_dense_cache(spec):
    torch.manual_seed(0)
    m = tiny_llama()
    ids = torch.randint(0, m.config.vocab_size, (1, 40))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        got, cache = _stream_logits(m, ids, spec)
    tol = 2e-3 if "kivi:8" in spec else 1e-5  # 8-bit codes on the quantized groups
    assert (got - ref).abs().max() < tol
    assert cache.get_seq_length() == 40


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_error_is_within_half_a_step_and_bytes_shrink(bits):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 32, 64, generator=g) * torch.linspace(0.1, 8, 64)  # outlier channels
    v = torch.randn(1, 2, 32, 64, generator=g)
    pk, pv = quantize_keys(k, bits), quantize_values(v, bits, 32)
    ek = (dequantize_keys(pk, k.dtype) - k).abs()
    ev = (dequantize_values(pv, 32, v.dtype) - v).abs()
    assert (ek <= pk.scale / 2 + 1e-5).all() and (ev.reshape(1, 2, 32, 2, 32) <= pv.scale / 2 + 1e-5).all()
    assert ek.max() > 0.1 * pk.scale.max()  # a real grid, not a copy
    # per channel over tokens: an outlier channel gets its own step, small channels stay precise
    assert ek[..., :8].mean() < ek[..., -8:].mean() / 5
    # packed: bits per number plus the scales and minima of each group
    assert pk.codes.numel() * 32 == k.numel() * bits
    store = KIVIStore(bits=bits, group=32, residual=32)
    kv = torch.randn(1, 3, 4096, 64, dtype=torch.bfloat16)
    store.append(kv, kv)
    dense = 2 * kv.numel() * 2
    assert len(store) == 4096 and store.k.shape[-2] < 64
    assert dense / store.nbytes() > (5 if bits == 2 else 3)


def test_shift_keys_is_the_rotary_position_change():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = tiny_llama()
    rot = m.model.rotary_emb
    x = torch.randn(1, 2, 5, m.config.hidden_size // m.config.num_attention_heads)
    pos = torch.tensor([[3, 7, 11, 20, 40]])
    cos, sin = rot(x, pos)
    _, k = apply_rotary_pos_emb(x, x, cos, sin)
    cos2, sin2 = rot(x, pos + 9)
    _, k2 = apply_rotary_pos_emb(x, x, cos2, sin2)
    assert torch.allclose(shift_keys(k, torch.tensor(9), layer_inv_freqs(m)[0]), k2, atol=1e-5)


def test_sinks_keep_the_first_and_last_tokens_at_cache_positions():
    """One layer, so a key depends only on its token and position: token t's logits with
    sinks S and window W equal a fresh forward over the S first tokens, the W before t and t,
    at positions 0 .. S + W (StreamingLLM's positions inside the cache)."""
    torch.manual_seed(0)
    m = tiny_llama(layers=1)
    S, W = 2, 6
    ids = torch.randint(0, m.config.vocab_size, (1, 30))
    with torch.no_grad():
        got, cache = _stream_logits(m, ids, f"sinks:{S},{W}", prefill=1)
        for t in (12, 20, 29):
            ctx = torch.cat([ids[:, :S], ids[:, t - W : t + 1]], dim=1)
            want = m(input_ids=ctx).logits[0, -1]
            assert torch.allclose(got[0, t], want, atol=1e-4), t
        # window-only at original positions differs from the cache-position forward
        got_orig, _ = _stream_logits(m, ids, f"sinks:{S},{W},pos=original", prefill=1)
    assert not torch.allclose(got_orig[0, 29], got[0, 29], atol=1e-3)
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == S + W + 1 and layer.get_seq_length() == 30


def test_h2o_keeps_the_tokens_that_took_the_attention():
    layer = PolicyLayer(heavy=2, window=3)
    k = torch.arange(10, dtype=torch.float32).reshape(1, 1, 10, 1).expand(1, 2, 10, 4).contiguous()  # key j holds j
    layer.update(k, k)
    probs = torch.full((1, 4, 1, 10), 0.01)
    probs[:, :2, :, 2] = 1.0  # the query heads of key/value head 0 favour token 2 ...
    probs[:, :2, :, 5] = 0.5
    probs[:, 2:, :, 1] = 1.0  # ... those of head 1 tokens 1 and 4
    probs[:, 2:, :, 4] = 0.7
    layer.observe(probs)
    new = torch.full((1, 2, 1, 4), 99.0)
    keys, _ = layer.update(new, new)
    assert keys[0, 0, :, 0].tolist() == [2, 5, 7, 8, 9, 99]
    assert keys[0, 1, :, 0].tolist() == [1, 4, 7, 8, 9, 99]
    assert layer.get_seq_length() == 11


def test_streaming_perplexity_is_the_ordinary_one_when_the_cache_covers():
    torch.manual_seed(1)
    m = tiny_llama()
    ids = torch.randint(0, m.config.vocab_size, (48,))
    with torch.no_grad():
        ref = float(torch.exp(F.cross_entropy(m(input_ids=ids[None]).logits[0, :-1], ids[1:])))
    for spec, chunk in (("full", 1), ("full", 16), ("sinks:4,60", 1)):
        assert stream_perplexity(m, ids, spec, chunk=chunk)["ppl"] == pytest.approx(ref, rel=1e-4)
    assert recompute_perplexity(m, ids, 64)["ppl"] == pytest.approx(ref, rel=1e-4)
    with torch.no_grad():
        each = F.cross_entropy(m(input_ids=ids[None]).logits[0, :-1], ids[1:], reduction="none")
    got = stream_perplexity(m, ids, "full", chunk=16, token_nll=True)
    assert got["token_nll"].shape == (47,) and torch.allclose(got["token_nll"], each, atol=1e-4)
    assert float(got["token_nll"].sum()) == pytest.approx(got["nll"], rel=1e-6) and "token_nll" not in stream_perplexity(m, ids, "full")
    small = stream_perplexity(m, ids, "window:8")
    assert small["ppl"] != pytest.approx(ref, rel=1e-4)
    assert small["cache_bytes_peak"] < stream_perplexity(m, ids, "full")["cache_bytes_peak"] / 3


def test_streaming_perplexity_takes_a_ready_cache_and_its_byte_counter():
    from transformers import DynamicCache

    torch.manual_seed(1)
    m = tiny_llama()
    ids = torch.randint(0, m.config.vocab_size, (40,))
    ref = stream_perplexity(m, ids, "full", chunk=8)
    calls = []
    got = stream_perplexity(m, ids, "full", chunk=8, cache=DynamicCache(config=m.config), nbytes=lambda c: calls.append(1) or 7)
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert got["cache_bytes"] == 7 and len(calls) == 6  # once per chunk (5) and at the end
    evicting = stream_perplexity(m, ids, "full", chunk=8, cache=build_cache(m, "window:8"))
    assert evicting["ppl"] == pytest.approx(stream_perplexity(m, ids, "window:8", chunk=8)["ppl"], rel=1e-6)
    assert evicting["ppl"] != pytest.approx(ref["ppl"], rel=1e-4)


def test_eviction_keeps_the_cache_flat():
    m = tiny_llama()
    ids = torch.randint(0, m.config.vocab_size, (1, 60))
    with torch.no_grad():
        _, c1 = _stream_logits(m, ids[:, :30], "sinks:2,8")
        _, c2 = _stream_logits(m, ids, "sinks:2,8")
    assert cache_bytes(c1) == cache_bytes(c2) > 0


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("kivi:5", "bits must be one of"),
        ("kivi:2,g32,r48", "multiple of the group"),
        ("sinks:4", "expected 2 number"),
        ("h2o:8,0", "at least 1 token"),
        ("sinks:4,10+window:8", "one eviction policy"),
        ("lru:8", "unknown policy"),
        ("h2o:8,200+kivi:2", "not supported"),
        ("sinks:4,64+kivi:2", "at least the residual"),
        ("window:8,pos=abs", "pos=cache or pos=original"),
    ],
)
def test_bad_policies_are_refused_clearly(spec, msg):
    with pytest.raises(UserError, match=msg):
        parse_policy(spec)


def test_model_checks():
    m = tiny_llama()
    hd = m.config.hidden_size // m.config.num_attention_heads
    with pytest.raises(UserError, match="does not divide the head dimension"):
        build_cache(m, f"kivi:2,g{hd * 2},r{hd * 2}")
    with pytest.raises(UserError, match="larger than the model's context"):
        build_cache(m, f"window:{m.config.max_position_embeddings + 1}")


def test_cli_eval_with_kv_policies(tiny_alias_folders, tmp_path, monkeypatch):
    import json

    from conftest import shrink_env

    from llmpress.cli import main

    for k, v in shrink_env(tiny_alias_folders).items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "kv.json"
    rc = main(["eval", "smollm2-135m", "--kv", "full", "--kv", "sinks:4,1020", "--kv", "window:8", "--kv", "kivi:2",
               "--tokens", "4096", "--passkey", "--no-progress", "--json", str(out)])  # fmt: skip
    assert rc == 0
    rep = json.loads(out.read_text())
    rows = {r["policy"]: r for r in rep["policies"]}
    assert rep["tokens"] == 32  # capped by the test shrink
    assert rows["sinks:4,1020"]["ppl"] == pytest.approx(rows["full"]["ppl"], rel=1e-5)  # the budget covers the stream
    assert rows["window:8"]["ppl"] != pytest.approx(rows["full"]["ppl"], rel=1e-5)
    assert rows["window:8"]["cache_bytes_peak"] < rows["full"]["cache_bytes_peak"] / 2
    assert isinstance(rows["full"]["passkey"]["correct"], bool) and rows["full"]["passkey"]["context"] >= 32


def test_cli_refuses_a_bad_policy_before_loading(capsys):
    from llmpress.cli import main

    rc = main(["eval", "no-such-model", "--kv", "kivi:5"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bits must be one of" in err[0]


def test_gemma3_local_layers_keep_their_sliding_cache_and_global_layers_take_the_policy():
    from conftest import tiny_gemma3
    from transformers.cache_utils import DynamicSlidingWindowLayer

    torch.manual_seed(0)
    m = tiny_gemma3(layers=6)  # five local layers, then one global
    ids = torch.randint(0, m.config.vocab_size, (48,))
    with torch.no_grad():
        ref = float(torch.exp(F.cross_entropy(m(input_ids=ids[None]).logits[0, :-1], ids[1:])))
    for spec in ("sinks:4,60", "h2o:30,30", "kivi:8,r16"):
        assert stream_perplexity(m, ids, spec)["ppl"] == pytest.approx(ref, rel=1e-4)
    assert stream_perplexity(m, ids, "window:8")["ppl"] != pytest.approx(ref, rel=1e-4)
    cache = build_cache(m, "window:8")
    assert [type(x) for x in cache.layers] == [DynamicSlidingWindowLayer] * 5 + [PolicyLayer]


def test_kivi_precision_sinks_keep_the_first_tokens_exact_and_quantize_the_rest():
    """kivi:B,sS: the first S tokens' keys and values stay as computed (the attention sink
    carries massive values a per-channel group would spread over its 2-bit steps); the rest is
    KIVI as without the option."""
    torch.manual_seed(0)
    m = tiny_llama()
    ids = torch.randint(0, m.config.vocab_size, (1, 70))
    p = parse_policy("kivi:2,g16,r16,s3")
    assert (p.sinks, p.window, p.kivi_bits, p.evicts) == (3, None, 2, False)
    assert parse_policy(p.describe()) == p and p.describe() == "kivi:2,g16,r16,s3"
    with torch.no_grad():
        _, full = _stream_logits(m, ids, "full")
        got, kept = _stream_logits(m, ids, "kivi:2,g16,r16,s3")
        _, plain = _stream_logits(m, ids, "kivi:2,g16,r16")
    for f, k, q in zip(full.layers, kept.layers, plain.layers):
        assert torch.equal(k.sink_k, f.keys[:, :, :3]) and torch.equal(k.sink_v, f.values[:, :, :3])
        assert len(k.store) == 67 and len(q.store) == 70
        kk, _ = k.store.full()
        assert not torch.equal(kk, f.keys[:, :, 3:])  # the rest is on the 2-bit grid
    assert kept.get_seq_length() == 70
    with pytest.raises(UserError, match="give the sinks there"):
        parse_policy("sinks:4,100+kivi:2,s1")


def test_pre_rope_keys_are_quantized_before_their_rotation():
    """kivi:...,pre: a key group is rotated back to before RoPE, quantized, and rotated forward
    when read. Keys that are one steady vector before RoPE (a channel's outlier at every token)
    come back exactly, at any start position; quantized after RoPE the same keys turn through
    each pair's circle over the group and take the 2-bit grid's error."""
    m = tiny_llama()
    inv = layer_inv_freqs(m)[0]
    D = 2 * inv.numel()
    steady = (torch.randn(1, 2, 1, D) * torch.linspace(0.5, 6, D)).expand(1, 2, 96, D)
    for start in (0, 37):
        keys = shift_keys(steady, torch.arange(start, start + 96), inv)  # after RoPE at positions start..
        pre, post = KIVIStore(bits=2, group=16, residual=16, inv_freq=inv), KIVIStore(bits=2, group=16, residual=16)
        for s in range(0, 96, 24):  # in chunks, as a prefill and decode would
            pre.append(keys[:, :, s : s + 24], keys[:, :, s : s + 24], pos=start + s)
            post.append(keys[:, :, s : s + 24], keys[:, :, s : s + 24], pos=start + s)
        assert pre.groups == post.groups == 5 and pre.nbytes() == post.nbytes()
        kp, _ = pre.full()
        kq, _ = post.full()
        assert (kp - keys).abs().max() < 1e-4
        assert (kq - keys).abs().max() > 0.05
        pre.drop_oldest_groups(2)  # eviction keeps the later groups at their positions
        assert (pre.full()[0] - keys[:, :, 32:]).abs().max() < 1e-4
    p = parse_policy("kivi:2,s1,pre")
    assert p.kivi_prerope and parse_policy(p.describe()) == p and p.describe() == "kivi:2,r128,s1,pre"
    with pytest.raises(UserError, match="pre .keys before RoPE."):
        parse_policy("kivi:2,prerope")


def test_pre_rope_needs_the_rotary_frequencies():
    m = tiny_llama()
    m.model.rotary_emb = None
    with pytest.raises(UserError, match="drop pre"):
        build_cache(m, "kivi:2,pre")


def test_gemma3_local_layers_are_kivi_quantized_within_their_window():
    """With KIVI the local (sliding-window) layers hold their window in codes too, evicted a
    group at a time: the model's sliding mask hides the extra tokens, so 8-bit codes give the
    dense logits over a stream 2.6 windows long, and the local layers hold no more than the
    window plus a group."""
    from conftest import tiny_gemma3

    from llmpress.kvcache.layers import SlidingKIVILayer

    torch.manual_seed(0)
    m = tiny_gemma3(layers=6)
    m.config.sliding_window = 96
    for layer in m.model.layers:
        if layer.self_attn.sliding_window:
            layer.self_attn.sliding_window = 96
    ids = torch.randint(0, m.config.vocab_size, (1, 250))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        got, cache = _stream_logits(m, ids, "kivi:8,g8,r16")
        _, dense = _stream_logits(m, ids, "full")
        two, low = _stream_logits(m, ids, "kivi:2,g8,r16,pre")
    assert [type(x) for x in cache.layers] == [SlidingKIVILayer] * 5 + [PolicyLayer]
    assert (got - ref).abs().max() < 2e-2 * ref.abs().max()
    assert (two - ref).abs().max() > 5 * (got - ref).abs().max()  # the local layers' codes count
    assert all(96 < x.cached() <= 104 for x in cache.layers[:5]) and cache.layers[5].cached() == 250
    local = lambda c: sum(x.keys.numel() * 8 if not isinstance(x, PolicyLayer) else x.nbytes() for x in c.layers[:5])  # noqa: E731
    assert local(low) < 0.6 * local(dense)  # 2-bit codes for the older tokens of the window, as in the global layer
