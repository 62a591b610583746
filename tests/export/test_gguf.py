"""GGUF export: read back with the gguf package's reader, every quantized tensor dequantized
by the gguf package's own code equals llmpress's dequantized weight bit for bit (q/k rows
un-permuted from llama.cpp's rotary order); Llama metadata and tokenizer; refusals of grids
without an exact GGUF form (exit 2, nothing written); scale_dtype: float16."""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch
from conftest import random_windows, tiny_llama, tiny_tokenizer
from helpers import QUIET

import llmpress
from llmpress import api, cli, stage
from llmpress.errors import RecipeError, UserError
from llmpress.export.gguf import export_gguf, rope_permute, rope_unpermute
from llmpress.quant import QuantArgs
from llmpress.quant.core import compute_qparams

GGUF_PRESETS = {"rtn-q4_0": "Q4_0", "gptq-q4_0": "Q4_0", "awq-gptq-q4_0": "Q4_0", "rtn-q8_0": "Q8_0", "rtn-q4_1": "Q4_1"}
LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@functools.cache
def _tokenizer():
    return tiny_tokenizer(300)  # 300 > the 259 byte-level symbols: the tokenizer has merges


def _model():
    return tiny_llama(vocab=len(_tokenizer()))


def _packed(tmp_path, recipe, model=None):
    """(packed checkpoint folder, the compressed model) of ``recipe`` on the tiny llama."""
    m = model or _model()
    rep = api.compress(m, recipe, data=random_windows(4, 32, vocab=len(_tokenizer())), engine=QUIET)
    return api.save(m, _tokenizer(), tmp_path / "packed", report=rep), m


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _field(reader, key):
    return reader.fields[key].contents()


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


def _gguf_weight(t, n_head=None) -> np.ndarray:
    """The gguf package's float32 [out, in] of a tensor, rows back in Hugging Face order."""
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
    return rope_unpermute(w, n_head) if n_head else w


def _check_linears(path, src, n_layers=2):
    """Every linear of the GGUF file against the checkpoint loaded by llmpress (exact decode)."""
    got = _tensors(path)
    loaded, _ = llmpress.load_compressed(str(src), backend="dequant")
    cfg = loaded.config
    types = set()
    for i in range(n_layers):
        for hf, gg in LINEARS.items():
            t = got[f"blk.{i}.{gg}.weight"]
            types.add(t.tensor_type.name)
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gg)
            want = loaded.get_submodule(f"model.layers.{i}.{hf}").dequantized_weight(torch.float32).numpy()
            assert np.array_equal(_bits(_gguf_weight(t, heads)), _bits(want)), (i, hf)
    return types


@pytest.mark.parametrize("preset", sorted(GGUF_PRESETS))
def test_preset_exports_bit_for_bit(tmp_path, preset):
    src, m = _packed(tmp_path, preset)
    out = export_gguf(src, tmp_path / "m.gguf", dtype="float32")
    assert _check_linears(out, src) == {GGUF_PRESETS[preset]}
    got = _tensors(out)
    # float tensors at float32: the model's own values; the tied head is the embedding (no output.weight)
    assert np.array_equal(_bits(got["token_embd.weight"].data), _bits(m.model.embed_tokens.weight.detach().numpy()))
    assert np.array_equal(_bits(got["blk.1.ffn_norm.weight"].data), _bits(m.model.layers[1].post_attention_layernorm.weight.detach().numpy()))
    assert "output.weight" not in got and got["output_norm.weight"].tensor_type.name == "F32"


def test_metadata_and_tokenizer(tmp_path):
    src, m = _packed(tmp_path, "rtn-q4_0")
    out = export_gguf(src, tmp_path / "m.gguf")
    r = gguf.GGUFReader(out)
    cfg, tok = m.config, _tokenizer()
    assert _field(r, "general.architecture") == "llama"
    want = {
        "llama.block_count": 2,
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": len(tok),
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tok.bos_token_id,
        "tokenizer.ggml.eos_token_id": tok.eos_token_id,
    }
    assert {k: _field(r, k) for k in want} == want
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    assert _field(r, "llama.rope.freq_base") == pytest.approx(theta, rel=1e-7)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tok) and [tokens[i] for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    merges = _field(r, "tokenizer.ggml.merges")
    assert len(merges) > 0 and all(len(x.split(" ")) == 2 for x in merges)
    # auto dtype: 2-D float weights as float16 (the embedding), norms float32
    got = _tensors(out)
    emb = m.model.embed_tokens.weight.detach().numpy()
    assert got["token_embd.weight"].tensor_type.name == "F16" and np.array_equal(got["token_embd.weight"].data, emb.astype(np.float16))
    assert got["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_quantized_tied_head_is_the_embedding(tmp_path):
    w = QuantArgs(bits=8, group_size=32, scale_dtype="float16")
    src, _ = _packed(
        tmp_path, [stage("rtn", weights=w), stage("rtn", targets=["lm_head"], ignore=[], weights=w)]
    )  # lm_head quantized too: tied to the embedding
    out = export_gguf(src, tmp_path / "m.gguf")
    got = _tensors(out)
    assert "output.weight" not in got and got["token_embd.weight"].tensor_type.name == "Q8_0"
    loaded, _ = llmpress.load_compressed(str(src), backend="dequant")
    want = loaded.lm_head.dequantized_weight(torch.float32).numpy()
    assert np.array_equal(_bits(_gguf_weight(got["token_embd.weight"])), _bits(want))
    assert _check_linears(out, src) == {"Q8_0"}


def test_untied_float_head_is_written_as_output(tmp_path):
    m = _model()
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone() * 0.5)
    src, _ = _packed(tmp_path, "rtn-q4_0", model=m)
    got = _tensors(export_gguf(src, tmp_path / "m.gguf", dtype="float32"))
    assert np.array_equal(_bits(got["output.weight"].data), _bits(m.lm_head.weight.detach().numpy()))
    assert np.array_equal(_bits(got["token_embd.weight"].data), _bits(m.model.embed_tokens.weight.detach().numpy()))


def test_rope_permutation_matches_llama_cpp_pairs():
    # HF rotates dims (j, j + d/2) of a head together; llama.cpp's Llama rope rotates (2j, 2j + 1):
    # after the permutation, rows 2j and 2j + 1 of each head are HF rows j and j + d/2
    n_head, d = 3, 8
    rows = np.arange(n_head * d)
    p = rope_permute(rows, n_head)
    for h in range(n_head):
        for j in range(d // 2):
            assert (p[h * d + 2 * j], p[h * d + 2 * j + 1]) == (h * d + j, h * d + j + d // 2)
    blocks = np.random.default_rng(0).integers(0, 255, (n_head * d, 18), dtype=np.uint8)
    assert np.array_equal(rope_unpermute(rope_permute(blocks, n_head), n_head), blocks)


def _refused(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1]


def _export_refused(tmp_path, capsys, src, words):
    """``llmpress export --format gguf`` of ``src`` exits 2 with one line naming the first layer and
    every word of ``words``, and writes nothing."""
    out = tmp_path / "outs" / "m.gguf"
    out.parent.mkdir()
    code, line = _refused(capsys, ["export", "--format", "gguf", str(src), "--out", str(out)])
    assert code == 2 and line.startswith("llmpress: error: layer model.layers.0.self_attn.q_proj ("), line
    assert all(w in line for w in words), line
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    "weights,words",
    [
        (QuantArgs(bits=4, group_size=64, full_range=True), ["g64", "gptq-q4_0", "32 weights"]),
        (QuantArgs(bits=3, group_size=32), ["int3", "no 3-bit", "gptq-q4_0"]),
        (QuantArgs(bits=4, group_size=32, full_range=True), ["not float16 values", "scale_dtype: float16", "gptq-q4_0"]),
        (QuantArgs(bits=4, group_size=32, symmetric=False), ["Q4_1", "scale_dtype: float16", "rtn-q4_1"]),
        (QuantArgs(bits=8, granularity="channel"), ["per-channel", "rtn-q8_0"]),
    ],
    ids=["g64", "int3", "fp32-scales", "asym-fp32-scales", "int8-channel"],
)
def test_grid_without_exact_form_is_refused_and_nothing_written(tmp_path, capsys, restore_logging, weights, words):
    src, _ = _packed(tmp_path, [stage("rtn", weights=weights, ignore=["lm_head"])])
    _export_refused(tmp_path, capsys, src, words)


def test_activation_quantization_and_other_architectures_are_refused(tmp_path):
    w = QuantArgs(bits=4, group_size=32, full_range=True, scale_dtype="float16")
    src, _ = _packed(tmp_path, [stage("rtn", weights=w, activations=QuantArgs(bits=8, granularity="token"), ignore=["lm_head"])])
    with pytest.raises(UserError, match=r"activation quantization \(int8 sym per-token\), which GGUF files do not carry"):
        export_gguf(src, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    cfg = (src / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "mistral"')
    (src / "config.json").write_text(cfg)
    with pytest.raises(UserError, match="supports the Llama and Gemma 3 architectures"):
        export_gguf(src, tmp_path / "a.gguf")


def test_cli_exports_and_refuses_existing_output(tmp_path, capsys, restore_logging):
    src, _ = _packed(tmp_path, "rtn-q8_0")
    out = tmp_path / "m.gguf"
    assert cli.main(["export", "--format", "gguf", str(src), "--out", str(out)]) == 0
    assert f"as gguf: {out}" in capsys.readouterr().out
    assert _check_linears(out, src) == {"Q8_0"}
    before = out.read_bytes()
    code, line = _refused(capsys, ["export", "--format", "gguf", str(src), "--out", str(out)])
    assert code == 2 and "exists; pass --overwrite" in line and out.read_bytes() == before
    code, line = _refused(capsys, ["export", "--format", "gguf", str(src), "--out", str(out), "--overwrite", "--dtype", "bfloat16"])
    assert code == 2 and "auto, float32, float16" in line
    assert cli.main(["export", "--format", "gguf", str(src), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() == before  # the same command writes the same bytes


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from llmpress.export import gguf as gguf_export

    src, _ = _packed(tmp_path, "rtn-q4_0")
    real = gguf_export._write

    def broken(path, *args):
        real(path, *args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_export, "_write", broken)
    with pytest.raises(UserError, match="No space left on device"):
        export_gguf(src, tmp_path / "outs" / "m.gguf")
    assert list((tmp_path / "outs").iterdir()) == []


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_dtype_float16_gives_fp16_scales(symmetric):
    x = torch.randn(16, 64)
    args = QuantArgs(bits=4, group_size=32, symmetric=symmetric, full_range=symmetric, scale_dtype="float16")
    qp = compute_qparams(x, args)
    assert torch.equal(qp.scale.half().float(), qp.scale)
    default = compute_qparams(x, QuantArgs(bits=4, group_size=32, symmetric=symmetric, full_range=symmetric))
    assert not torch.equal(default.scale.half().float(), default.scale)  # float32 scales by default
    assert float((qp.scale / default.scale - 1).abs().max()) <= (2**-7 if not symmetric else 2**-11)
    if not symmetric:  # -zero * scale is a float16 value too (Q4_1's minimum)
        m = -qp.zero_point * qp.scale
        assert torch.equal(m.half().float(), m)
    assert args.describe().endswith("fp16-scales")
    with pytest.raises(RecipeError, match="scale_dtype"):
        QuantArgs(scale_dtype="bfloat16")
    with pytest.raises(RecipeError, match="scale_dtype applies to integer grids"):
        QuantArgs(kind="ternary", scale_dtype="float16")


def test_run_time_part_is_refused(tmp_path):
    src, _ = _packed(tmp_path, "quarot-w4a4kv4-rtn")
    with pytest.raises(UserError, match=r"online rotations .* cannot be stored in GGUF"):
        export_gguf(src, tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.slow
def test_smollm2_q4_0_exports_bit_for_bit(tmp_path):
    """The packaged SmolLM2-135M (Llama, GQA 9/3 heads, tied embeddings, 49152 tokens) through
    rtn-q4_0: every linear of the GGUF equals llmpress's weights, metadata from its config."""
    model, tok = llmpress.load("smollm2-135m")
    rep = api.compress(model, "rtn-q4_0", engine=QUIET)
    src = api.save(model, tok, tmp_path / "packed", report=rep)
    out = export_gguf(src, tmp_path / "smollm2.gguf")
    assert _check_linears(out, src, n_layers=30) == {"Q4_0"}
    r = gguf.GGUFReader(out)
    assert [_field(r, k) for k in ("llama.block_count", "llama.attention.head_count", "llama.attention.head_count_kv")] == [30, 9, 3]
    assert len(_field(r, "tokenizer.ggml.tokens")) == 49152 and len(r.fields["tokenizer.ggml.merges"].data) > 40000
    assert "output.weight" not in _tensors(out)


@pytest.mark.parametrize(
    ("pre", "name"),
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
        (
            {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False}]},
            "smollm",
        ),
        ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, {"type": "ByteLevel"}]}, None),
        ({"type": "ByteLevel", "add_prefix_space": True}, None),
        ({"type": "Metaspace"}, None),
    ],
)
def test_pre_tokenizer_names_only_exact_llama_cpp_matches(pre, name):
    from llmpress.export.gguf import _pre_tokenizer

    if name is None:
        with pytest.raises(UserError, match="no known llama.cpp name"):
            _pre_tokenizer({"pre_tokenizer": pre})
    else:
        assert _pre_tokenizer({"pre_tokenizer": pre}) == name
