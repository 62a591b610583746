import pytest
import torch

from conftest import random_windows, tiny_gemma3, tiny_llama
from llmpress import compress, stage
from llmpress.arch import get_arch
from llmpress.errors import UnsupportedArchitecture
from llmpress.quant import QuantArgs
from llmpress.runtime.act_quant import ActQuantLinear
from llmpress.transform.duquant import greedy_block_rotation, spreading_rotation, zigzag_permutation, duquant_transform
from llmpress.transform.hadamard import hadamard_transform
from llmpress.transform.rotate import fuse_norms, rotate_residual


def _logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("rotation", ["random_hadamard", "hadamard", "random"])
def test_quarot_keeps_fp_outputs(family, rotation):
    m = MODELS[family]()
    ids = random_windows(2, 32)
    ref = _logits(m, ids)
    compress(m, [stage("quarot", rotation=rotation)], data=ids)
    assert _rel(_logits(m, ids), ref) < 1e-4
    summary = m.llmpress_transforms[-1]
    assert summary["residual_rotation"] == (family == "llama")
    assert set(summary["online"]) >= {"o_in", "down_in", "qk"}


@pytest.mark.parametrize("family", MODELS)
def test_duquant_keeps_fp_outputs(family):
    m = MODELS[family]()
    ids = random_windows(4, 32)
    ref = _logits(m, ids)
    compress(m, [stage("duquant", block_size=16, steps=4, windows=2)], data=ids)
    assert _rel(_logits(m, ids), ref) < 1e-4


@pytest.mark.parametrize("family", MODELS)
def test_norm_fusion_alone_is_exact(family):
    m = MODELS[family]()
    spec = get_arch(m)
    ids = random_windows(2, 16)
    ref = _logits(m, ids)
    fuse_norms(m, spec, final=family == "llama")
    assert _rel(_logits(m, ids), ref) < 1e-5
    w = m.model.layers[0].input_layernorm.weight
    assert torch.all(w == (0.0 if family == "gemma3" else 1.0))


def test_llama_head_is_untied_and_embeddings_rotated():
    m = tiny_llama()
    e0 = m.model.embed_tokens.weight.detach().clone()
    compress(m, [stage("quarot")], data=random_windows(1, 8))
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert m.config.tie_word_embeddings is False
    assert not torch.allclose(m.model.embed_tokens.weight, e0)
    # rows keep their norm: the rotation is orthogonal
    assert torch.allclose(m.model.embed_tokens.weight.norm(dim=1), e0.norm(dim=1), rtol=1e-5)


def test_gemma3_residual_rotation_refused():
    m = tiny_gemma3()
    with pytest.raises(UnsupportedArchitecture, match="post_attention_layernorm"):
        rotate_residual(m, get_arch(m), torch.eye(64, dtype=torch.float64))


def test_online_down_rotation_precedes_activation_quant():
    """The quantized activation of down_proj is the Hadamard-rotated one."""
    m = tiny_llama()
    ids = random_windows(1, 16)
    seen = {}
    h = m.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, i: seen.__setitem__("x", i[0].detach()))
    _logits(m, ids)
    h.remove()
    compress(m, [stage("quarot"), stage("rtn", targets=[r"re:.*mlp\.down_proj"], weights=None, activations=QuantArgs(bits=8, granularity="token"))], data=ids)
    down = m.model.layers[0].mlp.down_proj
    assert isinstance(down, ActQuantLinear)
    h = down.register_forward_pre_hook(lambda _m, i: seen.__setitem__("y", i[0].detach()))
    _logits(m, ids)
    h.remove()
    assert torch.allclose(seen["y"], hadamard_transform(seen["x"]), atol=1e-4)


def _kurtosis(x):
    x = x.reshape(-1, x.shape[-1]).double()
    x = x - x.mean()
    return (x.pow(4).mean() / x.pow(2).mean() ** 2).item()


@pytest.mark.parametrize("method", ["quarot", "duquant"])
def test_rotation_removes_an_injected_outlier_channel(method):
    m = tiny_llama()
    with torch.no_grad():  # a massive residual channel, like SmolLM2's channel 507
        m.model.embed_tokens.weight[:, 7] = 40.0
    ids = random_windows(4, 32)
    got = {}

    def grab(key):
        return lambda _m, i: got.__setitem__(key, i[0].detach())

    h = m.model.layers[1].self_attn.q_proj.register_forward_pre_hook(grab("before"))
    _logits(m, ids)
    h.remove()
    kw = dict(block_size=16, steps=8, windows=4) if method == "duquant" else {}
    compress(m, [stage(method, **kw)], data=ids)
    h = m.model.layers[1].self_attn.q_proj.register_forward_pre_hook(grab("after"))
    _logits(m, ids)
    h.remove()
    ratio = lambda x: (x.abs().amax() / x.abs().median()).item()  # noqa: E731
    assert ratio(got["after"]) < ratio(got["before"]) / 4
    assert _kurtosis(got["after"]) < _kurtosis(got["before"]) / 4


def test_quarot_w4a4_kv4_runs_and_beats_no_rotation():
    ids = random_windows(4, 32)

    def model():
        m = tiny_llama()
        with torch.no_grad():  # an outlier channel in the residual stream
            m.model.embed_tokens.weight[:, 7] *= 30
        return m

    centered = lambda t: t - t.mean(-1, keepdim=True)  # noqa: E731
    ref = centered(_logits(model(), ids))
    errs = {}
    for rot in (False, True):
        m = model()
        stages = ([stage("quarot")] if rot else []) + [
            stage("kv_quant"),
            stage("rtn", weights=QuantArgs(bits=4, group_size=32), activations=QuantArgs(bits=4, granularity="token")),
        ]
        compress(m, stages, data=ids)
        errs[rot] = _rel(centered(_logits(m, ids)), ref)
    assert errs[True] < 0.8 * errs[False]


# ----------------------------------------------------------------------------- DuQuant pieces


def test_spreading_rotation_spreads_the_chosen_channel():
    g = torch.Generator().manual_seed(0)
    r = spreading_rotation(16, 5, g)
    assert torch.allclose(r @ r.T, torch.eye(16, dtype=r.dtype), atol=1e-12)
    e = torch.zeros(16, dtype=torch.float64)
    e[5] = 1
    assert torch.allclose(e @ r, torch.full((16,), 0.25, dtype=torch.float64), atol=1e-12)


def test_greedy_block_rotation_lowers_the_max():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g, dtype=torch.float64)
    x[:, 3] *= 30
    x[:, 20] *= 10
    r = greedy_block_rotation(x, 8, g)
    assert torch.allclose(r @ r.T, torch.eye(32, dtype=r.dtype), atol=1e-10)
    assert (x @ r).abs().max() < x.abs().max() / 3


def test_zigzag_balances_blocks():
    cm = torch.tensor([100.0, 90, 80, 70, 1, 1, 1, 1])
    perm = zigzag_permutation(cm, 2)
    blocks = cm[perm].view(2, 4)
    assert sorted(perm.tolist()) == list(range(8))
    # zigzag: block 0 gets ranks 0 and 3, block 1 ranks 1 and 2
    assert set(perm[:4].tolist()) >= {0, 3} and set(perm[4:].tolist()) >= {1, 2}
    assert abs(blocks[0].sum() - blocks[1].sum()) <= 20


def test_duquant_transform_is_orthogonal_and_flattens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g)
    x[:, [2, 3, 40]] *= 25
    rot = duquant_transform(x, block=16, steps=8)
    m = rot.matrix()
    assert torch.allclose(m @ m.T, torch.eye(64, dtype=m.dtype), atol=1e-10)
    y = rot(x)
    assert y.abs().max() < x.abs().max() / 2.5
