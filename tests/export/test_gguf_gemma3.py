"""GGUF export of Gemma 3 (model_type gemma3_text): read back with the gguf package's reader,
every linear equals llmpress's dequantized weight bit for bit (rows in HF order: no rotary
permutation), every norm is stored as w + 1 (Gemma's x * (1 + w), as llama.cpp's converter
writes it), the Gemma 3 metadata keys and the SentencePiece-style tokenizer (scores that make
llama.cpp's highest-score-first merging Hugging Face's BPE); transformers loads the file and
gives llmpress's logits; refusals of what llama.cpp's Gemma 3 cannot run."""

from __future__ import annotations

import functools
import json

import gguf
import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, random_windows, tiny_spm_tokenizer
from helpers import QUIET
from test_gguf import LINEARS, _bits, _field, _refused, _tensors

import llmpress
from llmpress import api
from llmpress.errors import UserError
from llmpress.export.gguf import export_gguf
from llmpress.export.gguf_vocab import spm_scores

NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
LAYERS = 6  # the default pattern: layer 5 global, the others sliding (what transformers' GGUF reader assumes)


@functools.cache
def _tokenizer():
    return tiny_spm_tokenizer()


def tiny_gemma3_head256(layers: int = LAYERS, seed: int = 0, **extra):
    """A tiny Gemma 3 whose attention scale llama.cpp shares: head_dim 256 = query_pre_attn_scalar."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=256,
        query_pre_attn_scalar=256,
        max_position_embeddings=256,
        sliding_window=8,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        **extra,
    )
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights so (1 + w) differs from 1
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.2)
    return m


def _packed(tmp_path, recipe=None, model=None):
    """(packed checkpoint of ``recipe`` on the tiny Gemma 3, or the float model when None, the model)."""
    m = model or tiny_gemma3_head256()
    if recipe is None:
        return api.save(m, _tokenizer(), tmp_path / "packed"), m
    rep = api.compress(m, recipe, data=random_windows(4, 32, vocab=len(_tokenizer())), engine=QUIET)
    return api.save(m, _tokenizer(), tmp_path / "packed", report=rep), m


@pytest.mark.parametrize(("preset", "qtype"), [("rtn-q8_0", "Q8_0"), ("rtn-q4_0", "Q4_0"), (None, "F32")])
def test_gemma3_exports_bit_for_bit(tmp_path, preset, qtype):
    src, m = _packed(tmp_path, preset)
    got = _tensors(export_gguf(src, tmp_path / "m.gguf", dtype="float32"))
    loaded, _ = llmpress.load_compressed(str(src), backend="dequant")
    for i in range(LAYERS):
        for hf, gg in LINEARS.items():
            t = got[f"blk.{i}.{gg}.weight"]
            assert t.tensor_type.name == qtype, (i, hf)
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
            mod = loaded.get_submodule(f"model.layers.{i}.{hf}")
            want = mod.dequantized_weight(torch.float32) if hasattr(mod, "dequantized_weight") else mod.weight
            assert np.array_equal(_bits(w), _bits(want.detach().numpy())), (i, hf)  # HF row order: no permutation
        for hf, gg in NORMS.items():
            w = m.get_submodule(f"model.layers.{i}.{hf}").weight.detach()
            t = got[f"blk.{i}.{gg}.weight"]
            assert t.tensor_type.name == "F32" and np.array_equal(_bits(t.data), _bits((w.float() + 1).numpy())), (i, hf)
    assert np.array_equal(_bits(got["output_norm.weight"].data), _bits((m.model.norm.weight.detach() + 1).numpy()))
    assert np.array_equal(_bits(got["token_embd.weight"].data), _bits(m.model.embed_tokens.weight.detach().numpy()))
    assert "output.weight" not in got  # tied: llama.cpp reads the embedding for the head


def test_gemma3_metadata_and_tokenizer(tmp_path):
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    m = tiny_gemma3_head256(layers=3, layer_types=layer_types, final_logit_softcapping=30.0)
    src, _ = _packed(tmp_path, "rtn-q8_0", model=m)
    r = gguf.GGUFReader(export_gguf(src, tmp_path / "m.gguf"))
    tok = _tokenizer()
    want = {
        "general.architecture": "gemma3",
        "gemma3.block_count": 3,
        "gemma3.context_length": 256,
        "gemma3.embedding_length": 64,
        "gemma3.feed_forward_length": 128,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 2,
        "gemma3.attention.key_length": 256,
        "gemma3.attention.value_length": 256,
        "gemma3.attention.sliding_window": 8,
        "gemma3.attention.sliding_window_pattern": [True, False, True],
        "gemma3.rope.freq_base": 1_000_000.0,
        "gemma3.rope.freq_base_swa": 10_000.0,
        "gemma3.final_logit_softcapping": 30.0,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.unknown_token_id": 3,
    }
    assert {k: _field(r, k) for k in want} == want
    assert _field(r, "gemma3.attention.layer_norm_rms_epsilon") == pytest.approx(m.config.rms_norm_eps, rel=1e-6)
    assert "gemma3.rope.dimension_count" not in r.fields  # llama.cpp: n_rot = head_dim
    tokens, types, scores = (_field(r, f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "scores"))
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    T = gguf.TokenType
    assert types[:4] == [T.CONTROL] * 4 and set(types[4:260]) == {T.BYTE} and set(types[260:]) == {T.NORMAL}
    assert scores[:4] == [-1000.0] * 4 and len(scores) == len(tok)


def _spm_encode(text: str, ids: dict, scores: dict) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm): from characters, join the adjacent
    pair whose joined text is a token of highest score (leftmost on ties); then bytes for the rest."""
    syms = list(text.replace(" ", "\u2581"))
    while True:
        best = None
        for k in range(len(syms) - 1):
            t = syms[k] + syms[k + 1]
            if t in ids and (best is None or scores[ids[t]] > best[0]):
                best = (scores[ids[t]], k)
        if best is None:
            break
        k = best[1]
        syms[k : k + 2] = [syms[k] + syms[k + 1]]
    return [i for s in syms for i in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


def test_spm_scores_reproduce_the_hf_tokenizer(tmp_path):
    tok = _tokenizer()
    tj = json.loads(tok.backend_tokenizer.to_str())
    vocab = tj["model"]["vocab"]
    scores = spm_scores(vocab, [tuple(x) for x in tj["model"]["merges"]], set(range(4)))
    scores = {i: scores.get(i, 0.0) for i in vocab.values()}
    texts = [TINY_TEXT[:300], "Outliers in quantization, née 2024: a few bits! ", "zebra quick"]
    for text in texts:
        assert _spm_encode(text, vocab, scores) == tok(text, add_special_tokens=False)["input_ids"], text
    # and the check can fail: reversed scores merge in another order
    flipped = {i: -s for i, s in scores.items()}
    assert any(_spm_encode(t, vocab, flipped) != tok(t, add_special_tokens=False)["input_ids"] for t in texts)


def test_transformers_loads_the_file_with_llmpress_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    src, _ = _packed(tmp_path, "rtn-q8_0")
    out = export_gguf(src, tmp_path / "m.gguf", dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ours, _ = llmpress.load_compressed(str(src), backend="dequant")
    x = random_windows(2, 24, vocab=len(_tokenizer()), seed=3)
    with torch.no_grad():
        want, got = ours(x).logits.float(), theirs(x).logits.float()
    assert theirs.config.layer_types == ours.config.layer_types and theirs.config.sliding_window == 8
    assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item()
    # and the check can fail: the file's norms read back without the shift are far off
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "norm" in n:
                p.add_(1.0)
        assert (theirs(x).logits - want).abs().max().item() > 0.05 * want.abs().max().item()


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0"),
        ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64 (llama.cpp assumes 256"),
        ({"hidden_activation": "relu"}, "activation 'relu'"),
        ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}, "rope scaling 'linear' (global layers)"),
    ],
    ids=["attn-softcap", "query-scalar", "activation", "rope-scaling"],
)
def test_what_llama_cpp_gemma3_cannot_run_is_refused(tmp_path, capsys, restore_logging, changes, words):
    src, _ = _packed(tmp_path, "rtn-q8_0")
    _edit_config(src, **changes)
    out = tmp_path / "outs" / "m.gguf"
    out.parent.mkdir()
    code, line = _refused(capsys, ["export", "--format", "gguf", str(src), "--out", str(out)])
    assert code == 2 and words in line, line
    assert list(out.parent.iterdir()) == []


def _edit_tokenizer(src, edit):
    tj = json.loads((src / "tokenizer.json").read_text())
    edit(tj)
    (src / "tokenizer.json").write_text(json.dumps(tj))


def _drop_first_split(tj):
    merges = tj["model"]["merges"]
    two = next(k for k, m in enumerate(merges) if len("".join(m)) == 2)
    del merges[two]


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_drop_first_split, "which no merge joins"),
        (lambda tj: tj["model"]["merges"].append(tj["model"]["merges"][0]), "are not consecutive"),
        (lambda tj: tj.update(normalizer={"type": "NFKC"}), "would split text differently"),
        (lambda tj: tj["model"].update(type="Unigram"), "tokenizer model 'Unigram'"),
    ],
    ids=["missing-merge", "scattered-merges", "normalizer", "unigram"],
)
def test_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path, edit, words):
    src, _ = _packed(tmp_path, "rtn-q8_0")
    _edit_tokenizer(src, edit)
    with pytest.raises(UserError, match=words):
        export_gguf(src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


SPM_MODEL = {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []}
REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}


@pytest.mark.parametrize(
    ("normalizer", "pre", "prefix"),
    [
        (REPLACE, None, False),  # Gemma 3 as transformers writes it from the GGUF
        (REPLACE, {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}, False),
        ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, REPLACE]}, None, True),  # Llama 2
        ({"type": "Sequence", "normalizers": [REPLACE, {"type": "Prepend", "prepend": "\u2581"}]}, None, None),
        (REPLACE, {"type": "Metaspace"}, None),
        ({"type": "NFKC"}, None, None),
    ],
)
def test_sentencepiece_style_shapes(normalizer, pre, prefix):
    from llmpress.export.gguf_vocab import _space_prefix, kind

    tj = {"model": SPM_MODEL, "normalizer": normalizer, "pre_tokenizer": pre}
    assert _space_prefix(tj) is prefix
    if prefix is None:
        with pytest.raises(UserError, match="would split text differently"):
            kind(tj)
    else:
        assert kind(tj) == "llama"


def test_gemma3_quantized_tied_head_is_the_embedding(tmp_path):
    src, _ = _packed(tmp_path, "gptq-q4_0-head8")
    got = _tensors(export_gguf(src, tmp_path / "m.gguf"))
    assert "output.weight" not in got and got["token_embd.weight"].tensor_type.name == "Q8_0"
    t = got["token_embd.weight"]
    loaded, _ = llmpress.load_compressed(str(src), backend="dequant")
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
    assert np.array_equal(_bits(w), _bits(loaded.lm_head.dequantized_weight(torch.float32).numpy()))
    assert got["blk.0.attn_q.weight"].tensor_type.name == "Q4_0"
