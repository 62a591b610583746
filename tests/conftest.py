"""Shared fixtures: tiny random models (llama, gemma3) and a tiny tokenizer, all offline."""

from __future__ import annotations

import pytest
import torch

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model compresses weights into fewer bits. "
    "Quantization maps real numbers to a small set of integers, and pruning removes weights. "
    "Outliers in activations make low-bit quantization hard; smoothing and rotation help. "
) * 20


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 256, **config):
    """A tiny random Llama; ``config``: more LlamaConfig fields (e.g. ``attention_bias=True``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **config,
    )
    m = LlamaForCausalLM(cfg).eval()
    if config.get("attention_bias"):
        with torch.no_grad():  # random biases (the default init is zero)
            for n, p in m.named_parameters():
                if n.endswith("proj.bias"):
                    p.normal_(0, 0.5)
    return m


def tiny_gemma3(seed: int = 0, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 256):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=16,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights so (1 + w) differs from 1
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.2)
    return m


TINY_MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}  # family -> builder of a tiny random model


def tiny_tokenizer(vocab: int = 256):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def tiny_spm_tokenizer(vocab: int = 400):
    """A Gemma-style tokenizer (what a SentencePiece BPE model converted to tokenizer.json is):
    <pad> <eos> <bos> <unk> at ids 0-3, the 256 <0xNN> byte tokens, then pieces learned on
    TINY_TEXT; spaces written as U+2581 by the normalizer, byte fallback, a BOS prepended, and a
    merge for every split of a piece into two pieces, grouped by the piece they make (in id order)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab - 256, special_tokens=specials, max_token_length=8)
    learner.train_from_iterator([TINY_TEXT[:400]] * 4, trainer)
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in learned if t not in specials]
    ids = {t: i for i, t in enumerate(pieces)}
    merges = [(t[:k], t[k:]) for t in pieces[260:] for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
    tok = Tokenizer(models.BPE(vocab=ids, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gemma():
    return tiny_gemma3()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny llama folder (safetensors + tokenizer) usable as a MODEL argument."""
    return save_tiny_model(tmp_path / "tiny-llama")


def save_tiny_model(folder, family: str = "llama", mutate=None, context: int | None = None):
    """Save a tiny random model of ``family`` (llama or gemma3) with the tiny tokenizer: an HF folder.
    ``mutate(model)``, when given, edits the weights (under ``no_grad``) before saving; ``context``:
    the config's ``max_position_embeddings`` (the aliases' stand-ins take the real models')."""
    tok = tiny_tokenizer()
    model = TINY_MODELS[family](vocab=len(tok))
    if context is not None:
        model.config.max_position_embeddings = context
    if mutate is not None:
        with torch.no_grad():
            mutate(model)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


# the packaged aliases and the tiny stand-ins the test shrink points them at
TINY_ALIASES = {"smollm2-135m": "llama", "gemma3-270m": "gemma3"}
ALIAS_CONTEXT = {"smollm2-135m": 8192, "gemma3-270m": 32768}  # the real models' max_position_embeddings
SHRINK_WINDOWS = 4  # calibration samples and evaluation windows
SHRINK_SEQLEN = 32  # tokens per window


@pytest.fixture(scope="session")
def tiny_alias_folders(tmp_path_factory) -> dict:
    """alias -> saved tiny model folder, for ``LLMPRESS_TEST_MODELS`` (made once per session)."""
    root = tmp_path_factory.mktemp("tiny-aliases")
    return {alias: save_tiny_model(root / alias, family, context=ALIAS_CONTEXT[alias]) for alias, family in TINY_ALIASES.items()}


def shrink_env(folders: dict, windows: int = SHRINK_WINDOWS, seqlen: int = SHRINK_SEQLEN) -> dict:
    """The ``LLMPRESS_TEST_*`` variables (llmpress/shrink.py) pointing the aliases at ``folders``."""
    return {
        "LLMPRESS_TEST_MODELS": ",".join(f"{a}={p}" for a, p in folders.items()),
        "LLMPRESS_TEST_WINDOWS": str(windows),
        "LLMPRESS_TEST_SEQLEN": str(seqlen),
    }


@pytest.fixture
def outs(tmp_path):
    """Parent folder of a run's output (not created): after a refusal it holds nothing, or only what was there."""
    return tmp_path / "outs"


@pytest.fixture
def tiny_text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TINY_TEXT * 5)
    return p


def random_windows(n: int = 8, seqlen: int = 32, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seqlen), generator=g)


@pytest.fixture
def restore_logging():
    """llmpress.cli.main() calls logging.basicConfig on the stream capsys hands it: undo it after the test."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Token caches and converted models go to the test's folder, not the user's cache."""
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def ext():
    """The compiled CPU-kernel extension (the kernel test files skip where it cannot be used)."""
    from llmpress.runtime import cpu_kernels

    mod = cpu_kernels.kernels()
    assert mod is not None, f"the kernels did not build: {cpu_kernels._state.get('reason')}"
    return mod
