"""The ``kquant`` method and the ``q4_k`` / ``q5_k`` storage forms (issue 21): GPTQ onto the
Q4_K and Q5_K grids decodes exactly and beats the grid's own rounding on a correlated problem;
llama.cpp's Q4_K_M / Q4_K_S / Q5_K_M / Q5_K_S type assignment (more-bits blocks, 256-column
fallbacks) on a tiny Llama; the awq-gptq-q4_k_m and -q5_k_m presets export bit for bit as GGUF
with those types and file types; sizes; refusals."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import gguf
import pytest
import torch
from conftest import random_windows, tiny_llama
from helpers import QUIET

sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
from test_gguf import _check_linears, _tensors, _tokenizer  # noqa: E402

import llmpress  # noqa: E402
from llmpress import RecipeError, UserError, api, stage  # noqa: E402
from llmpress.export.compressed_tensors import export_compressed_tensors  # noqa: E402
from llmpress.export.gguf import export_gguf  # noqa: E402
from llmpress.export.packed_load import read_manifest  # noqa: E402
from llmpress.export.packed_size import checkpoint_accounting  # noqa: E402
from llmpress.quant.iq4 import iq4_params  # noqa: E402
from llmpress.quant.kquant import k_params, q4_k_params, q5_k_params  # noqa: E402
from llmpress.quant.q4k import GGUFMix, KQuant, grid_gptq, mix_type, more_bits, own_grid, storable_type  # noqa: E402
from llmpress.runtime.cpu_kernels import kernels  # noqa: E402


def _problem(R=48, C=512, seed=0):
    """A weight and a Hessian of correlated inputs with spread-out scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C, generator=g)
    X = torch.randn(4096, C // 8, generator=g) @ torch.randn(C // 8, C, generator=g) + 0.3 * torch.randn(4096, C, generator=g)
    X = X * torch.linspace(0.2, 3.0, C)
    return W, 2 * X.t() @ X / X.shape[0]


def _err(Wq, W, H):
    D = Wq - W
    return float(((D @ H) * D).sum())


def _gptq(W, H, qtype):
    return grid_gptq(W, H, qtype=qtype, importance=True, block_size=64, damp=0.01, act_order=True)


@pytest.mark.parametrize(
    ("qtype", "params", "top"),
    [
        ("Q2_K", lambda W, importance=None: k_params(W, importance, bits=2), 3),
        ("Q4_K", q4_k_params, 15),
        ("Q5_K", q5_k_params, 31),
        ("IQ4_NL", lambda W, importance=None: iq4_params(W, importance, xs=False), 15),
        ("IQ4_XS", lambda W, importance=None: iq4_params(W, importance, xs=True), 15),
    ],
)
def test_gptq_on_a_fixed_gguf_grid_decodes_exactly_and_beats_rounding(qtype, params, top):
    W, H = _problem()
    res, p = _gptq(W, H, qtype)
    assert torch.equal(res.weight, p.dequantize())  # the weight is exactly the grid's
    assert int(p.codes.min()) >= 0 and int(p.codes.max()) == top
    assert torch.equal(p.d.half().float(), p.d)
    plain, weighted = _err(params(W).dequantize(), W, H), _err(params(W, importance=torch.diagonal(H)).dequantize(), W, H)
    gptq = _err(res.weight, W, H)
    assert weighted < plain and gptq < 0.8 * weighted, (plain, weighted, gptq)
    if qtype == "Q5_K":  # one more bit: about a quarter of Q4_K's error
        q4 = _err(_gptq(W, H, "Q4_K")[0].weight, W, H)
        assert gptq < 0.4 * q4, (gptq, q4)
    # the grid is the one fitted before the sweep: GPTQ only moves codes
    p0 = params(W, importance=torch.diagonal(H))
    assert torch.equal(p.d, p0.d) and (p.sc is None or torch.equal(p.sc, p0.sc)) and not torch.equal(p.codes, p0.codes)


def test_llama_cpp_type_assignment():
    # 30 blocks (SmolLM2): llama.cpp's Q4_K_M file has 14 attn_v / ffn_down tensors at the higher type
    n = 30
    more = [i for i in range(n) if more_bits(i, n)]
    assert len(more) == 14 and more[:3] == [0, 1, 2] and more[-4:] == [26, 27, 28, 29]
    assert all((i - 3) % 3 == 2 for i in more if 3 <= i < 26)
    assert mix_type("q4_k_m", "v", 0, n) == "Q6_K" and mix_type("q4_k_m", "v", 3, n) == "Q4_K"
    assert mix_type("q4_k_s", "down", 3, n) == "Q4_K" and mix_type("q4_k_s", "head", None, n) == "Q6_K"
    assert mix_type("q4_k_m", "other", 0, n) == "Q4_K"
    # Q4_K_S: Q5_K for attn_v of the first 4 blocks and ffn_down of the first n/8 (3 of 30)
    s = {r: [i for i in range(n) if mix_type("q4_k_s", r, i, n) == "Q5_K"] for r in ("v", "down", "other")}
    assert s == {"v": [0, 1, 2, 3], "down": [0, 1, 2], "other": []}
    assert mix_type("q4_k_s", "v", 4, n) == "Q4_K" and mix_type("q4_k_s", "head", None, n) == "Q6_K"
    # Q5_K_M: Q4_K_M's rule over Q5_K; Q5_K_S: Q5_K everywhere but the head
    for r in ("v", "down"):
        assert [mix_type("q5_k_m", r, i, n) for i in range(n)] == ["Q6_K" if i in more else "Q5_K" for i in range(n)]
    assert mix_type("q5_k_m", "other", 0, n) == "Q5_K" and mix_type("q5_k_m", "head", None, n) == "Q6_K"
    assert {mix_type("q5_k_s", r, i, n) for r in ("v", "down", "other") for i in range(n)} == {"Q5_K"}
    # Q3_K_M: attn_v Q5_K in blocks 0-1, Q4_K after; ffn_down Q5_K in the first n/16 (1 of 30), Q4_K after;
    # attn_output Q4_K; Q3_K_L: Q5_K for all three; Q3_K_S: Q3_K everywhere but the head
    assert [mix_type("q3_k_m", "v", i, n) for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert [mix_type("q3_k_m", "down", i, n) for i in range(3)] == ["Q5_K", "Q4_K", "Q4_K"]
    assert {mix_type("q3_k_m", "o", i, n) for i in range(n)} == {"Q4_K"} and mix_type("q3_k_m", "other", 0, n) == "Q3_K"
    assert {mix_type("q3_k_l", r, i, n) for r in ("v", "down", "o") for i in range(n)} == {"Q5_K"}
    assert mix_type("q3_k_l", "other", 5, n) == "Q3_K" and mix_type("q3_k_l", "head", None, n) == "Q6_K"
    assert {mix_type("q3_k_s", r, i, n) for r in ("v", "down", "o", "other") for i in range(n)} == {"Q3_K"}
    assert [storable_type(t, 576) for t in ("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0")] == ["Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q5_0"]
    assert [storable_type(t, 1536) for t in ("Q3_K", "Q4_K", "Q5_K", "Q6_K")] == ["Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    # IQ4_NL / IQ4_XS: the type everywhere; attn_v Q5_K where 4+ query heads share a key/value head (SmolLM2: 3)
    assert {mix_type("iq4_xs", r, i, n, gqa=3) for r in ("v", "down", "o", "other") for i in range(n)} == {"IQ4_XS"}
    assert mix_type("iq4_xs", "v", 7, n, gqa=4) == "Q5_K" and mix_type("iq4_nl", "down", 0, n, gqa=8) == "IQ4_NL"
    assert mix_type("iq4_nl", "head", None, n) == "Q6_K"
    # Q2_K: Q3_K for attn_v (Q4_K at GQA >= 4), ffn_down and attn_output; Q2_K_S: Q4_K for the first n/8 ffn_down
    assert [mix_type("q2_k", r, 5, n, gqa=3) for r in ("v", "down", "o", "other")] == ["Q3_K", "Q3_K", "Q3_K", "Q2_K"]
    assert mix_type("q2_k", "v", 5, n, gqa=4) == "Q4_K" and mix_type("q2_k_s", "v", 5, n, gqa=3) == "Q2_K"
    assert [mix_type("q2_k_s", "down", i, n) for i in (2, 3)] == ["Q4_K", "Q2_K"] and mix_type("q2_k_s", "o", 0, n) == "Q2_K"
    assert storable_type("Q2_K", 576) == "Q4_0"
    assert [storable_type("IQ4_XS", c) for c in (576, 1536)] == ["IQ4_NL", "IQ4_XS"]


def _compressed(tmp_path, hidden, recipe="awq-gptq-q4_k_m", layers=8):
    m = tiny_llama(layers=layers, hidden=hidden, inter=512, vocab=len(_tokenizer()))
    rep = api.compress(m, recipe, data=random_windows(4, 32, vocab=len(_tokenizer())), engine=QUIET)
    return api.save(m, _tokenizer(), tmp_path / f"packed{hidden}", report=rep), rep


@pytest.mark.parametrize(
    ("hidden", "want"),
    [
        # 8 blocks: more bits in blocks 0, 3, 6, 7
        (256, {("attn_v", "Q6_K"): 4, ("attn_v", "Q4_K"): 4, ("ffn_down", "Q6_K"): 4, ("ffn_down", "Q4_K"): 4, ("token_embd", "Q6_K"): 1}),
        # rows of 96: Q4_K -> Q5_0, Q6_K -> Q8_0 (ffn_down's 512-wide rows keep the K-quants)
        (96, {("attn_v", "Q8_0"): 4, ("attn_v", "Q5_0"): 4, ("ffn_down", "Q6_K"): 4, ("ffn_down", "Q4_K"): 4, ("token_embd", "Q8_0"): 1}),
    ],
)
def test_q4_k_m_preset_exports_llama_cpp_types_bit_for_bit(tmp_path, hidden, want):
    src, rep = _compressed(tmp_path, hidden)
    out = export_gguf(src, tmp_path / "m.gguf", dtype="float32")
    assert _check_linears(out, src, n_layers=8) == ({"Q4_K", "Q6_K"} if hidden == 256 else {"Q5_0", "Q8_0", "Q4_K", "Q6_K"})
    types = collections.Counter((n.split(".")[-2], t.tensor_type.name) for n, t in _tensors(out).items() if t.tensor_type.name not in ("F16", "F32"))
    for key, count in want.items():
        assert types[key] == count, (key, types)
    other = "Q4_K" if hidden == 256 else "Q5_0"
    assert all(types[(r, other)] == 8 for r in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")), types
    r = gguf.GGUFReader(out)
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert rep.stages["stage0:gguf_mix"]["types"] == {t: sum(c for (_, tt), c in types.items() if tt == t) for t in sorted({t for _, t in types})}
    mf = read_manifest(src)
    down = mf["layers"]["model.layers.1.mlp.down_proj"]
    assert down["kind"] == "q4_k"
    if hidden == 96:
        assert mf["layers"]["model.layers.1.self_attn.q_proj"]["kind"] == "quant"


@pytest.mark.parametrize(
    ("preset", "hidden", "want", "file_type"),
    [
        # 8 blocks: more bits (Q6_K) in blocks 0, 3, 6, 7; Q5_K elsewhere
        ("awq-gptq-q5_k_m", 256, {("attn_v", "Q6_K"): 4, ("attn_v", "Q5_K"): 4, ("ffn_down", "Q6_K"): 4, ("ffn_down", "Q5_K"): 4,
                                  ("attn_q", "Q5_K"): 8, ("ffn_up", "Q5_K"): 8, ("token_embd", "Q6_K"): 1}, "MOSTLY_Q5_K_M"),
        # rows of 96: Q5_K -> Q5_1, Q6_K -> Q8_0
        ("awq-gptq-q5_k_m", 96, {("attn_v", "Q8_0"): 4, ("attn_v", "Q5_1"): 4, ("ffn_down", "Q6_K"): 4, ("ffn_down", "Q5_K"): 4,
                                 ("attn_q", "Q5_1"): 8, ("ffn_up", "Q5_1"): 8, ("token_embd", "Q8_0"): 1}, "MOSTLY_Q5_K_M"),
        # Q5_K for attn_v of blocks 0-3 and ffn_down of block 0 (8 / 8), Q4_K elsewhere, the head Q6_K
        ("awq-gptq-q4_k_s", 256, {("attn_v", "Q5_K"): 4, ("attn_v", "Q4_K"): 4, ("ffn_down", "Q5_K"): 1, ("ffn_down", "Q4_K"): 7,
                                  ("attn_q", "Q4_K"): 8, ("token_embd", "Q6_K"): 1}, "MOSTLY_Q4_K_S"),
        # Q5_K for attn_v of blocks 0-1, Q4_K for the other attn_v, every ffn_down (8 / 16 = 0 first blocks) and attn_output
        ("awq-gptq-q3_k_m", 256, {("attn_v", "Q5_K"): 2, ("attn_v", "Q4_K"): 6, ("ffn_down", "Q4_K"): 8, ("attn_output", "Q4_K"): 8,
                                  ("attn_q", "Q3_K"): 8, ("ffn_gate", "Q3_K"): 8, ("token_embd", "Q6_K"): 1}, "MOSTLY_Q3_K_M"),
        # Q3_K for attn_v (2 query heads per key/value head), ffn_down and attn_output; Q2_K elsewhere
        ("awq-gptq-q2_k", 256, {("attn_v", "Q3_K"): 8, ("ffn_down", "Q3_K"): 8, ("attn_output", "Q3_K"): 8, ("attn_q", "Q2_K"): 8,
                                ("ffn_up", "Q2_K"): 8, ("token_embd", "Q6_K"): 1}, "MOSTLY_Q2_K"),
        # IQ4_XS everywhere (the tiny Llama's 4 query heads share 2 key/value heads: no Q5_K attn_v)
        ("awq-gptq-iq4_xs", 256, {("attn_v", "IQ4_XS"): 8, ("ffn_down", "IQ4_XS"): 8, ("attn_q", "IQ4_XS"): 8, ("ffn_up", "IQ4_XS"): 8,
                                  ("token_embd", "Q6_K"): 1}, "MOSTLY_IQ4_XS"),
        # rows of 96: IQ4_XS -> IQ4_NL, Q6_K -> Q8_0
        ("awq-gptq-iq4_xs", 96, {("attn_v", "IQ4_NL"): 8, ("ffn_down", "IQ4_XS"): 8, ("attn_q", "IQ4_NL"): 8, ("token_embd", "Q8_0"): 1},
         "MOSTLY_IQ4_XS"),
        # rows of 96: Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1
        ("awq-gptq-q3_k_m", 96, {("attn_v", "Q5_1"): 2, ("attn_v", "Q5_0"): 6, ("ffn_down", "Q4_K"): 8, ("attn_output", "Q5_0"): 8,
                                 ("attn_q", "Q4_0"): 8, ("ffn_gate", "Q4_0"): 8, ("token_embd", "Q8_0"): 1}, "MOSTLY_Q3_K_M"),
    ],
)  # fmt: skip
def test_other_k_mix_presets_export_llama_cpp_types_bit_for_bit(tmp_path, preset, hidden, want, file_type):
    src, rep = _compressed(tmp_path, hidden, recipe=preset)
    out = export_gguf(src, tmp_path / "m.gguf", dtype="float32")
    got = _check_linears(out, src, n_layers=8)  # every linear decodes in gguf to llmpress's weight bit for bit
    types = collections.Counter((n.split(".")[-2], t.tensor_type.name) for n, t in _tensors(out).items() if t.tensor_type.name not in ("F16", "F32"))
    for key, count in want.items():
        assert types[key] == count, (key, types)
    assert got == {t for (role, t) in types if role != "token_embd"}
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == int(getattr(gguf.LlamaFileType, file_type))
    kinds = collections.Counter(v["kind"] for v in read_manifest(src)["layers"].values())
    for form, qtype in (("q2_k", "Q2_K"), ("q4_k", "Q4_K"), ("q5_k", "Q5_K"), ("iq4_nl", "IQ4_NL"), ("iq4_xs", "IQ4_XS")):
        assert kinds[form] == sum(c for (_, t), c in types.items() if t == qtype), (form, kinds)


def _k_layers(tmp_path, qtype: str, bits_per_weight: float):
    """A 2-block 256-wide tiny Llama whose block linears are all ``qtype``, saved; checks that
    the checkpoint and the report count ``bits_per_weight`` for them."""
    src, rep = _compressed(tmp_path, 256, recipe=[stage("kquant", ignore=["lm_head"], type=qtype, damp=0.1)], layers=2)
    n = sum(
        mod.weight.numel() for name, mod in tiny_llama(hidden=256, inter=512).named_modules() if "layers." in name and hasattr(mod, "in_features")
    )
    acc = checkpoint_accounting(read_manifest(src))
    assert acc["theoretical_bytes_16bit_scales"] - acc["other_bytes"] == n * bits_per_weight / 8
    assert {round(v["bits_per_weight"], 6) for v in rep.layers.values()} == {bits_per_weight}
    return src


def test_q5_k_layers_count_5_5_bits_and_load_exactly(tmp_path):
    src = _k_layers(tmp_path, "Q5_K", 5.5)
    loaded, _ = llmpress.load_compressed(str(src))
    lin = loaded.model.layers[1].mlp.down_proj
    assert type(lin).__name__ == "DequantLinear"  # no 5-bit kernel: decoded once, exact
    q4_src = _k_layers(tmp_path / "q4", "Q4_K", 4.5)
    m = tiny_llama(hidden=256, inter=512, vocab=len(_tokenizer()))
    x = random_windows(2, 16, vocab=len(_tokenizer()), seed=3)
    q4, _ = llmpress.load_compressed(str(q4_src), backend="dequant")
    with torch.no_grad():
        ref = m(x).logits
        err5, err4 = (loaded(x).logits - ref).pow(2).mean(), (q4(x).logits - ref).pow(2).mean()
    assert 0 < float(err5) < 0.5 * float(err4)  # one more bit: nearer the float model
    with pytest.raises(UserError, match="q5_k"):
        export_compressed_tensors(src, tmp_path / "ct")


def test_q2_k_layers_count_2_625_bits_and_load_exactly(tmp_path):
    src = _k_layers(tmp_path, "Q2_K", 2.625)
    exact, _ = llmpress.load_compressed(str(src), backend="dequant")
    served, _ = llmpress.load_compressed(str(src))
    assert type(served.model.layers[1].mlp.down_proj).__name__ == "DequantLinear"
    x = random_windows(2, 16, vocab=len(_tokenizer()), seed=3)
    with torch.no_grad():
        assert torch.equal(served(x).logits, exact(x).logits)


def test_q4_k_layers_count_4_5_bits_and_load(tmp_path):
    src = _k_layers(tmp_path, "Q4_K", 4.5)
    loaded, _ = llmpress.load_compressed(str(src))
    m = tiny_llama(hidden=256, inter=512, vocab=len(_tokenizer()))
    x = random_windows(2, 16, vocab=len(_tokenizer()), seed=3)
    with torch.no_grad():
        diff = (loaded(x).logits - m(x).logits).abs().max()
    assert 0 < float(diff) < 1.0  # quantized, and close to the float model
    # served by the int4 kernel (a float offset per group) where it is built, within float rounding of the exact weight
    exact, _ = llmpress.load_compressed(str(src), backend="dequant")
    lin, ref = loaded.model.layers[1].mlp.down_proj, exact.model.layers[1].mlp.down_proj
    assert type(lin).__name__ == ("LowbitInt4Linear" if kernels() is not None else "DequantLinear")
    assert type(ref).__name__ == "DequantLinear"
    w = ref.dequantized_weight()
    assert float((lin.dequantized_weight() - w).abs().max()) <= 1e-6 * float(w.abs().max())
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, exact(x).logits, atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="q4_k"):
        export_compressed_tensors(src, tmp_path / "ct")


def test_round_solver_is_the_grid_search():
    W, H = _problem(R=16, C=256, seed=1)
    from llmpress.quant.q4k import kquant
    from llmpress.registry import ModuleContext, ModuleRecord

    lin = torch.nn.Linear(256, 16, bias=False)
    lin.weight.data.copy_(W)
    rec = ModuleRecord(name="x", out_features=16, in_features=256)
    kquant(ModuleContext(name="x", module=lin, stats={"hessian": H}, record=rec), KQuant(solver="round"))
    assert torch.equal(lin.weight.data, q4_k_params(W, importance=torch.diagonal(H)).dequantize())
    assert rec.form == "q4_k" and rec.notes["gguf_type"] == "Q4_K"


@pytest.mark.parametrize("qtype", ["Q4_K", "IQ4_XS"])
def test_shrink_on_a_gguf_grid_spans_gptq_to_rounding(qtype):
    """shrink 1 leaves only H's diagonal (no error feedback): the grid's nearest codes, as the
    round solver; in between, the calibration error lies between GPTQ's and rounding's."""
    W, H = _problem(R=16, C=256, seed=2)

    def solve(shrink):
        return grid_gptq(W, H, qtype=qtype, importance=True, block_size=64, damp=0.01, act_order=True, shrink=shrink)

    full, half, diag = (solve(s)[0].weight for s in (0.0, 0.5, 1.0))
    rounded = own_grid(W, torch.diagonal(H), qtype).dequantize()
    assert torch.equal(diag, rounded)
    e = [_err(w, W, H) for w in (full, half, diag)]
    assert e[0] < e[1] < e[2], e


@pytest.mark.parametrize("qtype", ["Q4_K", "Q4_0"])
def test_the_stage_passes_its_regularizers_to_the_sweep(qtype):
    """``kquant``'s ``shrink`` reaches both sweeps (a K-quant's own grid and a legacy type through
    gptq): shrink 1 gives the round solver's weights, shrink 0.5 a third result between them."""
    from llmpress.quant.q4k import kquant
    from llmpress.registry import ModuleContext, ModuleRecord

    W, H = _problem(R=16, C=256, seed=3)

    def run(**fields):
        lin = torch.nn.Linear(256, 16, bias=False)
        lin.weight.data.copy_(W)
        rec = ModuleRecord(name="x", out_features=16, in_features=256)
        kquant(ModuleContext(name="x", module=lin, stats={"hessian": H.clone()}, record=rec), KQuant(type=qtype, **fields))
        assert rec.notes["gguf_type"] == qtype
        return lin.weight.data.clone()

    rounded, full, half, diag = run(solver="round"), run(), run(shrink=0.5), run(shrink=1.0)
    assert torch.equal(diag, rounded)
    e = [_err(w, W, H) for w in (full, half, diag)]
    assert e[0] < e[1] < e[2], e


@pytest.mark.parametrize(
    ("cls", "fields", "fragment"),
    [
        (KQuant, {"type": "IQ3_S"}, "type='IQ3_S'"),
        (KQuant, {"shrink": 1.5}, "shrink=1.5"),
        (KQuant, {"diag_floor": -0.1}, "diag_floor=-0.1"),
        (KQuant, {"solver": "sgd"}, "solver='sgd'"),
        (KQuant, {"damp": -1.0}, "damp"),
        (GGUFMix, {"mix": "iq2_xs"}, "mix='iq2_xs'"),
    ],
)
def test_bad_fields(cls, fields, fragment):
    with pytest.raises(RecipeError, match=fragment):
        cls(**fields)


def test_rows_off_32_are_refused_before_work():
    m, fresh = tiny_llama(hidden=48, inter=80), tiny_llama(hidden=48, inter=80)
    with pytest.raises(RecipeError, match="48 input columns; GGUF blocks need a multiple of 32"):
        api.compress(m, [stage("kquant")], data=random_windows(2, 16), engine=QUIET)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), fresh.state_dict().values()))


def test_tied_head_on_q4_k_is_the_embedding(tmp_path):
    """A Q4_K head of a tied model: the loaded embedding reads the head's decoded rows (the
    same logits as the compressed model) and the GGUF file holds it once, as token_embd."""
    m = tiny_llama(hidden=256, inter=512, vocab=len(_tokenizer()))
    rep = api.compress(
        m, [stage("kquant", targets=["lm_head"], ignore=[], type="Q4_K")], data=random_windows(4, 32, vocab=len(_tokenizer())), engine=QUIET
    )
    src = api.save(m, _tokenizer(), tmp_path / "packed", report=rep)
    assert read_manifest(src)["tied_quant_embeddings"] == {"model.embed_tokens.weight": "lm_head"}
    loaded, _ = llmpress.load_compressed(str(src), backend="dequant")
    served, _ = llmpress.load_compressed(str(src))
    x = random_windows(2, 16, vocab=len(_tokenizer()), seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, m(x).logits)
        assert torch.allclose(served(x).logits, m(x).logits, atol=1e-4, rtol=0)
    assert not torch.equal(m.model.embed_tokens.weight, tiny_llama(hidden=256, inter=512, vocab=len(_tokenizer())).model.embed_tokens.weight)
    types = {n: t.tensor_type.name for n, t in _tensors(export_gguf(src, tmp_path / "m.gguf")).items() if not n.startswith("blk")}
    assert types == {"token_embd.weight": "Q4_K", "output_norm.weight": "F32"}


def test_round_solver_weighs_a_dead_input_as_an_average_one():
    """A column the calibration never saw (H_jj = 0) is weighed in the grid search as an
    average live input (as GPTQ's preparation treats it), not given no weight at all."""
    W, H = _problem(R=8, C=256, seed=2)
    H[:32, :] = 0.0
    H[:, :32] = 0.0  # the first group of 32 columns is dead
    from llmpress.quant.q4k import kquant
    from llmpress.registry import ModuleContext, ModuleRecord

    lin = torch.nn.Linear(256, 8, bias=False)
    lin.weight.data.copy_(W)
    kquant(
        ModuleContext(name="x", module=lin, stats={"hessian": H.clone()}, record=ModuleRecord(name="x", out_features=8, in_features=256)),
        KQuant(solver="round"),
    )
    d = torch.diagonal(H).clone()
    d[:32] = d[32:].mean()
    assert torch.equal(lin.weight.data, q4_k_params(W, importance=d).dequantize())
    assert not torch.equal(lin.weight.data, q4_k_params(W, importance=torch.diagonal(H)).dequantize())
