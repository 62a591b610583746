import re

import pytest
import torch
from conftest import TINY_MODELS, random_windows, tiny_gemma3, tiny_llama
from helpers import logits, rel_err

from llmpress import compress, stage
from llmpress.arch import get_arch
from llmpress.errors import UnsupportedArchitecture, UserError
from llmpress.quant import QuantArgs
from llmpress.runtime.act_quant import ActQuantLinear
from llmpress.runtime.online_hadamard import block_matmul
from llmpress.transform.duquant import duquant_transform, greedy_block_rotation, spreading_rotation, zigzag_permutation
from llmpress.transform.hadamard import hadamard_transform
from llmpress.transform.rotation import fuse_norms, rotate_residual


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("rotation", ["random_hadamard", "hadamard", "random"])
def test_quarot_keeps_fp_outputs(family, rotation):
    m = TINY_MODELS[family]()
    ids = random_windows(2, 32)
    ref = logits(m, ids)
    compress(m, [stage("quarot", rotation=rotation)], data=ids)
    assert rel_err(logits(m, ids), ref) < 1e-4
    summary = m.llmpress_transforms[-1]
    assert summary["residual_rotation"] == (family == "llama")
    assert set(summary["online"]) >= {"o_in", "down_in", "qk"}


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("residual", ["offline", "online"])
def test_duquant_keeps_fp_outputs(family, residual):
    m = TINY_MODELS[family]()
    ids = random_windows(4, 32)
    ref = logits(m, ids)
    compress(m, [stage("duquant", block_size=16, steps=4, windows=2, residual=residual)], data=ids)
    assert rel_err(logits(m, ids), ref) < 1e-4


@pytest.mark.parametrize("family", TINY_MODELS)
def test_norm_fusion_alone_is_exact(family):
    m = TINY_MODELS[family]()
    spec = get_arch(m)
    ids = random_windows(2, 16)
    ref = logits(m, ids)
    fuse_norms(m, spec, final=family == "llama")
    assert rel_err(logits(m, ids), ref) < 1e-5
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
    logits(m, ids)
    h.remove()
    compress(
        m,
        [stage("quarot"), stage("rtn", targets=[r"re:.*mlp\.down_proj"], weights=None, activations=QuantArgs(bits=8, granularity="token"))],
        data=ids,
    )
    down = m.model.layers[0].mlp.down_proj
    assert isinstance(down, ActQuantLinear)
    h = down.register_forward_pre_hook(lambda _m, i: seen.__setitem__("y", i[0].detach()))
    logits(m, ids)
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
    logits(m, ids)
    h.remove()
    kw = dict(block_size=16, steps=8, windows=4) if method == "duquant" else {}
    compress(m, [stage(method, **kw)], data=ids)
    h = m.model.layers[1].self_attn.q_proj.register_forward_pre_hook(grab("after"))
    logits(m, ids)
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
    ref = centered(logits(model(), ids))
    errs = {}
    for rot in (False, True):
        m = model()
        stages = ([stage("quarot")] if rot else []) + [
            stage("kv_quant"),
            stage("rtn", weights=QuantArgs(bits=4, group_size=32), activations=QuantArgs(bits=4, granularity="token")),
        ]
        compress(m, stages, data=ids)
        errs[rot] = rel_err(centered(logits(m, ids)), ref)
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


def test_block_matmul_equals_the_block_diagonal_product():
    g = torch.Generator().manual_seed(2)
    r = torch.randn(6, 8, 8, generator=g, dtype=torch.float64)
    dense = torch.block_diag(*r)
    for shape in [(48,), (5, 48), (3, 7, 48)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        assert torch.allclose(block_matmul(x, r), x @ dense, atol=1e-12)
    x = torch.randn(2, 3, 48, generator=g)
    assert block_matmul(x, r).dtype == torch.float32


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("method", ["quarot", "duquant", "quarot-online"])
def test_runtime_export_import_round_trip(family, method, tmp_path):
    """Saved folded weights + exported runtime reproduce the rotated model's outputs."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from llmpress.runtime.rotation_state import export_runtime, import_runtime

    m = TINY_MODELS[family]()
    ids = random_windows(4, 32)
    kw = dict(block_size=16, steps=4, windows=2) if method == "duquant" else {}
    if method == "quarot-online":
        method, kw = "quarot", dict(residual="online")
    compress(m, [stage(method, **kw), stage("kv_quant")], data=ids)
    want = logits(m, ids)
    desc, tensors = export_runtime(m)
    m.save_pretrained(tmp_path / "m", safe_serialization=True)
    (tmp_path / "rt.json").write_text(json.dumps(desc))
    if tensors:
        save_file(tensors, str(tmp_path / "rt.safetensors"))
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert rel_err(logits(m2, ids), want) > 1e-3  # folded weights alone are not the model
    import_runtime(m2, json.loads((tmp_path / "rt.json").read_text()), load_file(str(tmp_path / "rt.safetensors")) if tensors else {})
    assert rel_err(logits(m2, ids), want) < 1e-5
    assert m2.llmpress_transforms[0]["method"] == method


ROTATION_PRESETS = [
    "quarot-w4a4kv4-rtn",
    "quarot-w4a4kv4-gptq",
    "duquant-w4a4kv4",
    "duquant-w4a4kv4-gptq",
    "duquant-w4a4kv4-blockwise",
    "quarot-w4a4kv4-blockwise",
    "duquant-w4a8",
    "spinquant-w4a4kv4",
    "spinquant-w4a4kv4-gptq",
    "quarot-w4a8",
    "quarot-w8a8",
    "kv4",
]


_PRESET_NAME = re.compile(
    r"^(?P<rot>quarot|duquant|spinquant)-w(?P<w>\d)a(?P<a>\d)(kv(?P<kv>\d))?(-(?P<solver>rtn|gptq|blockwise))?$|^kv(?P<kv_only>\d)$"
)


@pytest.mark.parametrize("name", ROTATION_PRESETS)
def test_rotation_presets_match_their_names(name):
    """quarot-w4a4kv4-gptq: a quarot stage first, a gptq stage last with int4 weights and
    int4 activations, int4 keys and values; no kv stage when the name has no kv."""
    from llmpress.recipe import load_recipe

    r = load_recipe(name)
    want = _PRESET_NAME.match(name)
    assert r.name == name and want, name
    methods = [s.method for s in r.stages]
    kv_bits = want["kv"] or want["kv_only"]
    kv = [s.config for s in r.stages if s.method == "kv_quant"]
    if kv_bits is None:
        assert kv == []
    else:
        assert len(kv) == 1 and kv[0].keys.bits == kv[0].values.bits == int(kv_bits)
    if want["kv_only"]:
        assert methods == ["kv_quant"]
        return
    assert methods[0] == want["rot"]
    assert methods[-1] == (want["solver"] or "rtn")
    last = r.stages[-1].config
    assert last.weights.bits == int(want["w"]) and last.activations.bits == int(want["a"])
    assert last.activations.granularity == "token"
    assert tuple(r.stages[-1].ignore) == ("lm_head",)


def _on_recorded_grid(m, recs) -> int:
    """Number of recorded linears; fails unless each one's weight is exactly on its grid."""
    from llmpress.quant import quantize

    for name, rec in recs.items():
        if rec.weight_args is None:
            continue
        w = dict(m.named_modules())[name].weight.data
        codes = quantize(w, rec.qparams, rec.weight_args)
        assert torch.equal(codes, torch.round(codes)), name
        assert codes.min() >= rec.weight_args.qmin and codes.max() <= rec.weight_args.qmax, name
    return sum(r.weight_args is not None for r in recs.values())


def test_quarot_presets_on_tiny_llama_cost_what_their_bits_say():
    """The output error vs full precision grows as bits shrink (W8A8 < KV4 only < W4A8 < W4A4KV4),
    every quantized weight sits on its grid, activations run through their quantizer."""
    ids = random_windows(2, 32, seed=10)
    ref = logits(tiny_llama(), ids)
    err = {}
    for name in ["quarot-w8a8", "kv4", "quarot-w4a8", "quarot-w4a4kv4-rtn"]:
        m = tiny_llama()
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        rep = compress(m, name, data=random_windows(2, 32))
        err[name] = rel_err(logits(m, ids), ref)
        if name == "kv4":  # only the KV cache: no weight changed
            assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
            continue
        assert _on_recorded_grid(m, rep.result.records) == 14
        acts = {n: mod.args.bits for n, mod in m.named_modules() if isinstance(mod, ActQuantLinear)}
        assert len(acts) == 14 and set(acts.values()) == {int(name.split("-w")[1][2])}
    assert 1e-3 < err["quarot-w8a8"] < 0.02
    assert err["quarot-w8a8"] < err["kv4"] < err["quarot-w4a8"] < err["quarot-w4a4kv4-rtn"] < 0.4


def test_second_rotation_is_refused():

    m = tiny_llama()
    ids = random_windows(2, 16)
    compress(m, [stage("quarot")], data=ids)
    with pytest.raises(UserError, match="already carries online rotations"):
        compress(m, [stage("quarot")], data=ids)


def _tiny_qwen(kind: str):
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v biases
        from transformers import Qwen2Config as C
        from transformers import Qwen2ForCausalLM as M
    else:  # QK-norm
        from transformers import Qwen3Config as C
        from transformers import Qwen3ForCausalLM as M
    cfg = C(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    m = M(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.normal_(0.5, 0.2)
    return m


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["quarot", "duquant"])
def test_rotation_invariance_other_llama_family(kind, method):
    m = _tiny_qwen(kind)
    ids = random_windows(4, 32)
    ref = logits(m, ids)
    kw = dict(block_size=16, steps=4, windows=2) if method == "duquant" else {}
    compress(m, [stage(method, **kw)], data=ids)
    assert rel_err(logits(m, ids), ref) < 1e-4


def test_gemma3_norm_outputs_rotate_with_their_gains():
    """gemma3: the online rotation takes the norm output with its gain (no fusion).

    A channel that is massive in the residual but scaled down by its norm gain (gemma's
    1 + w near 0) must stay small where it is quantized: fusing the gain into the readers
    and then rotating would spread it over every channel (RTN errors of the readers grew
    10-35x on gemma-3-270m that way).
    """
    from llmpress.quant.core import fake_quantize

    m = tiny_gemma3()
    c = 5
    with torch.no_grad():
        m.model.embed_tokens.weight[:, c] += 40.0  # a massive residual channel
        for blk in m.model.layers:
            blk.input_layernorm.weight[c] = -0.999  # gain 1 + w = 0.001
    gains = [blk.input_layernorm.weight.clone() for blk in m.model.layers]
    ids = random_windows(2, 24)
    args = QuantArgs(bits=4, group_size=16)

    def q_error(model):
        got = {}

        def hook(mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1])
            w = mod.weight
            got["e"] = float((x @ (fake_quantize(w, args) - w).T).norm() / (x @ w.T).norm())

        lin = model.model.layers[0].self_attn.q_proj
        lin = getattr(lin, "linear", lin)
        h = lin.register_forward_pre_hook(hook)
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        h.remove()
        return got["e"], ref

    e0, ref = q_error(m)
    compress(m, [stage("quarot")], data=ids)
    e1, out = q_error(m)
    assert rel_err(out, ref) < 1e-4
    for blk, g in zip(m.model.layers, gains):
        assert torch.equal(blk.input_layernorm.weight, g)  # gains kept, not fused
    assert e1 < 1.5 * e0


def test_quarot_online_residual_on_llama_keeps_outputs_and_gains():
    m = tiny_llama()
    ids = random_windows(2, 24)
    gains = [blk.post_attention_layernorm.weight.clone() for blk in m.model.layers]
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    compress(m, [stage("quarot", residual="online")], data=ids)
    with torch.no_grad():
        out = m(input_ids=ids).logits
    assert rel_err(out, ref) < 1e-4
    assert all(torch.equal(b.post_attention_layernorm.weight, g) for b, g in zip(m.model.layers, gains))
    assert m.llmpress_transforms[-1]["residual_rotation"] is False
    assert m.llmpress_transforms[-1]["online"]["norm_in"]["blocks"] == 2 * len(m.model.layers)  # two norms per block
    with pytest.raises(Exception, match="residual"):
        compress(tiny_llama(), [stage("quarot", residual="sideways")], data=ids)


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("norms", [True, False])
def test_duquant_smoothing_keeps_fp_outputs_and_moves_the_weights(family, norms):
    from llmpress.transform.duquant import smooth_model

    m = TINY_MODELS[family]()
    with torch.no_grad():  # an outlier channel at the attention input: smoothing has work to do
        m.model.layers[0].input_layernorm.weight[5] += 10.0
    ids = random_windows(4, 32)
    ref = logits(m, ids)
    spec = get_arch(m)
    norm0 = m.model.layers[0].input_layernorm.weight.detach().clone()
    down0 = m.model.layers[1].mlp.down_proj.weight.detach().clone()
    n, alphas = smooth_model(m, spec, ids, alpha=0.6, norms=norms)
    assert n == 2 * (4 if norms else 2) and all(set(a.values()) == {0.6} for a in alphas)
    assert rel_err(logits(m, ids), ref) < 1e-5
    assert torch.equal(m.model.layers[0].input_layernorm.weight, norm0) != norms
    assert not torch.equal(m.model.layers[1].mlp.down_proj.weight, down0)
    if norms:  # the outlier channel is scaled down at the norm, up in q/k/v's columns
        assert m.model.layers[0].input_layernorm.weight[5].abs() < norm0[5].abs() / 2


def test_duquant_smoothing_options():
    from llmpress.transform.duquant import DuQuant

    for bad in (1.5, "best", -0.1):
        with pytest.raises(UserError, match="smooth_alpha"):
            DuQuant(smooth_alpha=bad)
    with pytest.raises(UserError, match="smooth_grid"):
        DuQuant(smooth_alpha="auto", smooth_grid=())
    with pytest.raises(UserError, match="search_act_bits"):
        DuQuant(smooth_alpha="auto", search_act_bits=1)
    from llmpress.registry import build_config

    assert build_config(DuQuant, {"smooth_alpha": "auto"}, "stage").smooth_alpha == "auto"
    assert build_config(DuQuant, {"smooth_alpha": 0.5}, "stage").smooth_alpha == 0.5
    with pytest.raises(UserError, match=r"stage\.smooth_alpha: expected a number or a word"):
        build_config(DuQuant, {"smooth_alpha": [0.5]}, "stage")
    with pytest.raises(UserError, match="smooth"):
        DuQuant(smooth="yes")
    assert DuQuant().smooth and DuQuant().smooth_alpha == 0.6
    m = tiny_llama()
    compress(m, [stage("duquant", block_size=16, steps=4, windows=2, residual="online")], data=random_windows(4, 32))
    assert m.llmpress_transforms[-1]["smoothed_points"] == 8 and m.llmpress_transforms[-1]["smooth_alpha"] == 0.6
    m = tiny_llama()
    compress(m, [stage("duquant", block_size=16, steps=4, windows=2, residual="offline", smooth=False)], data=random_windows(4, 32))
    assert m.llmpress_transforms[-1]["smoothed_points"] == 0


def test_smoothing_error_prefers_smoothing_an_outlier_channel():
    from llmpress.transform.duquant import AlphaSearch, smoothing_error
    from llmpress.transform.scaling import smooth_scales

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 60.0  # one channel far larger than the rest: 4-bit tokens lose the others
    w = torch.randn(32, 64, generator=g)
    search = AlphaSearch(
        grid=(0.5,), block_size=16, steps=0, seed=0, weights=QuantArgs(bits=4, group_size=64), activations=QuantArgs(bits=4, granularity="token")
    )
    s = smooth_scales(x.abs().amax(0), w.abs().amax(0), 0.5)
    plain, smoothed = smoothing_error(x, [w], None, search, 0), smoothing_error(x, [w], s, search, 0)
    assert smoothed < 0.5 * plain
    ref = float((x @ w.T - fake_quant_pair(x, w)).pow(2).sum())
    assert abs(plain - ref) <= 1e-4 * ref  # steps 0: the transform is a permutation, exact for per-token / group-64 scales


def fake_quant_pair(x, w):
    from llmpress.quant.core import fake_quantize

    return fake_quantize(x, QuantArgs(bits=4, granularity="token")) @ fake_quantize(w, QuantArgs(bits=4, group_size=64)).T


@pytest.mark.parametrize("family", TINY_MODELS)
def test_duquant_alpha_search_keeps_fp_outputs_and_records_choices(family):
    m = TINY_MODELS[family]()
    with torch.no_grad():  # a planted outlier channel at block 0's attention input
        m.model.layers[0].input_layernorm.weight[5] += 10.0
    ids = random_windows(4, 32)
    ref = logits(m, ids)
    compress(m, [stage("duquant", block_size=16, steps=4, windows=4, residual="online", smooth_alpha="auto", smooth_grid=[0.4, 0.6])], data=ids)
    assert rel_err(logits(m, ids), ref) < 1e-4
    t = m.llmpress_transforms[-1]
    alphas = t["smooth_alphas"]
    assert len(alphas) == len(m.model.layers) and all(set(a.values()) <= {None, 0.4, 0.6} for a in alphas)
    assert alphas[0]["input_layernorm"] is not None  # the planted channel is smoothed
    assert t["smoothed_points"] == sum(v is not None for a in alphas for v in a.values())
