"""Architecture as data (llmpress.arch): the ArchSpec of llama and gemma3 names real modules of
the tiny models, the groups follow the data flow, and an unknown architecture is a clear error."""

from __future__ import annotations

import pytest
import torch.nn as nn
from conftest import TINY_MODELS, tiny_llama

from llmpress.arch import ARCHS, blocks, get_arch, get_module, set_module, supported
from llmpress.errors import UnsupportedArchitecture


def test_supported_lists_every_model_type():
    assert supported() == ["gemma3", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"]
    assert ARCHS["gemma3"] is ARCHS["gemma3_text"]  # one spec per family, found by each model_type


def test_llama_spec():
    spec = get_arch(tiny_llama())
    assert spec.family == "llama" and spec.model_types == ("llama",)
    assert (spec.norm_kind, spec.needs_bos, spec.qk_norm, spec.post_norms) == ("rms", False, (), ())
    assert spec.block_linears() == (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )  # fmt: skip
    assert spec.groups() == (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",),
    )  # fmt: skip
    assert [(f.norm, f.linears) for f in spec.norm_feeds] == [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ]


def test_gemma3_spec():
    spec = get_arch(TINY_MODELS["gemma3"]())
    assert spec.family == "gemma3" and spec.model_types == ("gemma3_text", "gemma3")
    assert (spec.norm_kind, spec.needs_bos) == ("rms_1p", True)  # x/rms * (1 + w); windows start with BOS
    assert spec.qk_norm == ("self_attn.q_norm", "self_attn.k_norm")
    assert spec.post_norms == ("post_attention_layernorm", "post_feedforward_layernorm")
    assert [f.norm for f in spec.norm_feeds] == ["input_layernorm", "pre_feedforward_layernorm"]
    assert spec.block_linears() == get_arch(tiny_llama()).block_linears()


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_every_path_of_the_spec_is_a_module_of_the_model(family):
    model = TINY_MODELS[family](layers=3)
    spec = get_arch(model)
    layers = blocks(model)
    assert layers is model.model.layers and len(layers) == 3
    assert isinstance(get_module(model, spec.embed), nn.Embedding)
    assert isinstance(get_module(model, spec.lm_head), nn.Linear)
    assert get_module(model, spec.final_norm) is model.model.norm
    for block in layers:
        shapes = {p: tuple(get_module(block, p).weight.shape) for p in spec.block_linears()}
        assert all(isinstance(get_module(block, p), nn.Linear) for p in spec.block_linears())
        assert shapes["mlp.down_proj"] == (64, 128) and shapes["mlp.up_proj"] == (128, 64)
        for feed in spec.norm_feeds:  # the norm's width is the input width of the linears it feeds
            width = get_module(block, feed.norm).weight.shape[0]
            assert all(get_module(block, p).in_features == width for p in feed.linears)
        for p in spec.qk_norm + spec.post_norms:
            assert get_module(block, p).weight.ndim == 1


def test_get_module_by_index_and_set_module():
    model = tiny_llama()
    assert get_module(model, "model.layers.1") is model.model.layers[1]
    new = nn.Linear(64, 64, bias=False)
    set_module(model, "model.layers.1.self_attn.q_proj", new)
    assert model.model.layers[1].self_attn.q_proj is new
    first = model.model.layers[0]
    set_module(model, "model.layers.1", first)  # an index as the last part
    assert model.model.layers[1] is first
    with pytest.raises(AttributeError):
        get_module(model, "model.layers.0.no_such")


def test_unknown_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UnsupportedArchitecture) as ei:
        get_arch(gpt2)
    assert str(ei.value) == (
        "unsupported architecture 'gpt2' (GPT2LMHeadModel); supported model_type values: gemma3, gemma3_text, llama, mistral, qwen2, qwen3"
    )
    with pytest.raises(UnsupportedArchitecture, match=r"unsupported architecture None \(Linear\)"):
        blocks(nn.Linear(2, 2))  # not a transformers model at all
