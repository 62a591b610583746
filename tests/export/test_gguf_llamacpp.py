"""llama.cpp itself runs llmpress's GGUF files (issue 21, part 2): the exported file's logits, by
llama.cpp's library through the llama-cpp-python bindings, against llmpress's own model loaded
from the same packed checkpoint.

Skipped unless llama.cpp is built (``benchmarks/llamacpp_build.sh`` prints the two variables):
``LLMPRESS_LLAMA_CPP`` (the folder with libllama.so) and ``LLMPRESS_LLAMA_CPP_PY`` (PYTHONPATH
entries for the bindings). llama.cpp is a benchmark tool here, never a dependency of llmpress.

Tolerance: llama.cpp's CPU matrix products quantize the activations to 8 bits per block of 32
(Q8_0, or Q8_1 for Q4_1) before the integer dot product with Q4_0/Q8_0/Q4_1 weights, and
accumulate in its own order; so the logits agree to a fraction of their spread, not bit for bit.
Asserted: the largest |difference| under 5% of the logits' standard deviation, the mean KL
divergence under 1e-3 nats, and the same top-1 token at >= 97% of positions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_windows
from test_gguf import _model, _packed, _tokenizer
from test_gguf_gemma3 import _packed as _gemma_packed
from test_gguf_gemma3 import _tokenizer as _gemma_tokenizer
from test_gguf_gemma3 import tiny_gemma3_head256

from llmpress import checkpoint
from llmpress.export import gguf_arch
from llmpress.export.gguf import export_gguf

LIB = os.environ.get("LLMPRESS_LLAMA_CPP")
PY = os.environ.get("LLMPRESS_LLAMA_CPP_PY")
pytestmark = pytest.mark.skipif(
    not (LIB and PY), reason="llama.cpp not built: run benchmarks/llamacpp_build.sh and set LLMPRESS_LLAMA_CPP / LLMPRESS_LLAMA_CPP_PY"
)


@pytest.fixture(scope="module")
def llama_cpp():
    os.environ["LLAMA_CPP_LIB_PATH"] = LIB
    for p in reversed(PY.split(":")):
        sys.path.insert(0, p)
    import llama_cpp

    return llama_cpp


def _llama_logits(llama_cpp, path, windows: torch.Tensor) -> torch.Tensor:
    n = windows.shape[1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n, n_batch=n, n_ubatch=n, n_threads=1, logits_all=True, verbose=False)
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        out.append(torch.from_numpy(llm.scores[:n].copy()))
    return torch.stack(out)


@pytest.mark.parametrize("preset", ["rtn-q4_0", "gptq-q4_0", "rtn-q8_0", "rtn-q4_1", "rtn-q5_0", "gptq-q4_0-head8"])
def test_llama_cpp_runs_the_exported_file_like_llmpress(tmp_path, llama_cpp, preset):
    src, _ = _packed(tmp_path, preset, model=_model())
    path = export_gguf(src, tmp_path / "m.gguf")
    ours, _ = checkpoint.load_compressed(src)
    windows = random_windows(3, 24, vocab=len(_tokenizer()), seed=7)
    with torch.no_grad():
        want = ours(windows).logits.float()
    _assert_close(_llama_logits(llama_cpp, path, windows), want)
    # and the comparison can fail: a file of other weights is far off
    other = export_gguf(_packed(tmp_path / "other", preset, model=_model().apply(_perturb))[0], tmp_path / "other.gguf")
    far = (_llama_logits(llama_cpp, other, windows) - want).abs().max().item() / want.std().item()
    assert far > 0.05


@pytest.mark.parametrize(
    ("preset", "min_top1"),
    [("awq-gptq-q4_k_m", 0.95), ("awq-gptq-q5_k_m", 0.95), ("awq-gptq-q3_k_m", 0.9), ("awq-gptq-q2_k", 0.9), ("awq-gptq-iq4_xs", 0.95)],
)
def test_llama_cpp_runs_llmpress_k_mixes_like_llmpress(tmp_path, llama_cpp, preset, min_top1):
    """awq-gptq-q4_k_m (q5_k_m, q3_k_m) on a tiny Llama with 256-wide rows (Q4_K (Q5_K; Q3_K,
    Q4_K, Q5_K) and Q6_K blocks) and on the 64-wide one (the Q5_0 (Q5_1; Q4_0, Q5_0, Q5_1) /
    Q8_0 fallbacks beside K-quant down projections): llama.cpp's logits agree with llmpress's. Tolerance as for Gemma 3 (0.15 std, KL 1e-4, top-1 95%): the
    K-quant products round the activations to 8 bits per block of 256 (Q8_K), coarser than the
    Q8_0 blocks of 32 beside Q4_0, over 8 layers (measured: 0.072 std, KL 1.3e-5, top-1 95.8%);
    the same file of sign-flipped weights is far off. At Q3_K_M the 3-bit tiny model's logits
    are flatter and near-ties flip more often (measured: KL 1.3e-5 as at Q4_K_M, top-1 91.7%),
    so top-1 is held to 90% there."""
    from conftest import tiny_llama

    windows = random_windows(3, 24, vocab=len(_tokenizer()), seed=7)
    for hidden in (256, 64):
        model = tiny_llama(layers=8, hidden=hidden, inter=512, vocab=len(_tokenizer()))
        src, _ = _packed(tmp_path / str(hidden), preset, model=model)
        path = export_gguf(src, tmp_path / f"m{hidden}.gguf")
        ours, _ = checkpoint.load_compressed(src)
        with torch.no_grad():
            want = ours(windows).logits.float()
        _assert_close(_llama_logits(llama_cpp, path, windows), want, max_diff=0.15, max_kl=1e-4, min_top1=min_top1)
    flipped = tiny_llama(layers=8, hidden=64, inter=512, vocab=len(_tokenizer())).apply(_perturb)
    other = export_gguf(_packed(tmp_path / "other", preset, model=flipped)[0], tmp_path / "other.gguf")
    far = (_llama_logits(llama_cpp, other, windows) - want).abs().max().item() / want.std().item()
    assert far > 0.15


def _assert_close(got: torch.Tensor, want: torch.Tensor, max_diff: float = 0.05, max_kl: float = 1e-3, min_top1: float = 0.97) -> None:
    assert got.shape == want.shape
    diff = (got - want).abs().max().item() / want.std().item()
    lw, lg = torch.log_softmax(want.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (lw.exp() * (lw - lg)).sum(-1).mean().item()
    top1 = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert diff < max_diff and kl < max_kl and top1 >= min_top1, (diff, kl, top1)


@pytest.mark.parametrize("preset", ["rtn-q4_0", "rtn-q8_0", None])
def test_llama_cpp_runs_an_exported_gemma3_like_llmpress(tmp_path, llama_cpp, preset, monkeypatch):
    """Gemma 3 (norms stored w + 1, sliding layers of window 8 within 24 tokens, one global layer,
    head_dim 256 > hidden 64; None: the float checkpoint). Tolerance: the float file agrees to
    0.008 std (the embedding / tied head at float16); the Q8_0 and Q4_0 files to 0.15 std, KL
    1e-5, top-1 70/72: llama.cpp rounds the inputs of quantized linears to Q8_0 blocks, and
    llmpress's own model with its 42 linear inputs so rounded moves by 0.14 std (6 layers, two
    more norms a block than Llama's 2-layer model, hence wider than its 0.05). The wrong file
    (norms as HF stores them) is 4.4 std off, KL 1.4e-2, top-1 0."""
    src, _ = _gemma_packed(tmp_path, preset, model=tiny_gemma3_head256())
    path = export_gguf(src, tmp_path / "m.gguf")
    ours, _ = checkpoint.load_compressed(src)
    windows = random_windows(3, 24, vocab=len(_gemma_tokenizer()), seed=7)
    with torch.no_grad():
        want = ours(windows).logits.float()
    _assert_close(_llama_logits(llama_cpp, path, windows), want, max_diff=0.25, max_kl=1e-4, min_top1=0.95)
    # and the comparison can fail: the same file with the norms as HF stores them (w, not w + 1)
    monkeypatch.setattr(gguf_arch.Hparams, "norm_shift", property(lambda self: 0.0))
    other = export_gguf(src, tmp_path / "unshifted.gguf")
    far = (_llama_logits(llama_cpp, other, windows) - want).abs().max().item() / want.std().item()
    assert far > 1.0


def test_llama_cpp_tokenizes_gemma3_text_like_the_checkpoint(tmp_path, llama_cpp):
    """llama.cpp's SentencePiece tokenizer on the exported vocabulary (scores from the merges)
    gives the checkpoint's Hugging Face token ids, BOS first."""
    from conftest import TINY_TEXT

    src, _ = _gemma_packed(tmp_path, "rtn-q8_0", model=tiny_gemma3_head256(layers=1))
    llm = llama_cpp.Llama(model_path=str(export_gguf(src, tmp_path / "m.gguf")), n_ctx=64, vocab_only=True, verbose=False)
    tok = _gemma_tokenizer()
    for text in [TINY_TEXT[:400], "Outliers in quantization, n\u00e9e 2024: a few bits!  Two  spaces. ", "zebra quick"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text


def _perturb(module):
    if isinstance(module, torch.nn.Linear) and module.out_features != len(_tokenizer()):
        with torch.no_grad():
            module.weight.mul_(-1.0)


def test_llama_cpp_converter_writes_what_llmpress_writes_for_gemma3(tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py (through benchmarks/llamacpp_convert.py, which gives
    it llmpress's tokenizer metadata) on the float tiny Gemma 3: every tensor bit for bit what
    llmpress's float32 export of the same model holds, every metadata key it writes the same."""
    import subprocess

    import gguf
    import numpy as np

    m = tiny_gemma3_head256()
    m.save_pretrained(tmp_path / "hf")
    _gemma_tokenizer().save_pretrained(tmp_path / "hf")
    src, _ = _gemma_packed(tmp_path, None, model=m)
    ours = gguf.GGUFReader(export_gguf(src, tmp_path / "ours.gguf", dtype="float32"))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "llamacpp_convert.py"
    cpp_src = Path(PY.split(":")[0]) / "vendor" / "llama.cpp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*PY.split(":"), *sys.path])}
    subprocess.run([sys.executable, script, cpp_src, tmp_path / "hf", "--outtype", "f32", "--outfile", tmp_path / "conv.gguf"], check=True, env=env)
    theirs = gguf.GGUFReader(tmp_path / "conv.gguf")
    ta, tb = ({t.name: t for t in r.tensors} for r in (ours, theirs))
    assert set(ta) == set(tb)
    for n, t in ta.items():
        assert t.tensor_type == tb[n].tensor_type and np.array_equal(t.data.view(np.uint8), tb[n].data.view(np.uint8)), n
    fa, fb = ({k: f.contents() for k, f in r.fields.items() if not k.startswith(("GGUF.", "general."))} for r in (ours, theirs))
    assert fb == {k: fa.get(k) for k in fb}  # theirs is a subset of ours, equal values
    assert set(fa) - set(fb) == {"gemma3.attention.sliding_window_pattern", "gemma3.vocab_size"}  # what ours adds


def test_readme_gguf_path_runs_as_written(tmp_path):
    """The README's GGUF block as a user runs it, line by line in one folder: ``llmpress`` lines
    through the installed entry point (the test shrink: packaged aliases -> tiny models), the
    ``llama-`` lines through the built llama.cpp tools. Asserted: every line exits 0, llama.cpp's
    perplexity is a finite number above 1 and llama-bench reports a token rate. The stand-in for
    the alias has a tokenizer with BPE merges (the session's tiny aliases have none at 256
    tokens, and llama.cpp refuses a byte-level BPE vocabulary without merges)."""
    import math
    import re
    import shlex
    import subprocess

    from conftest import TINY_MODELS, TINY_TEXT, shrink_env, tiny_tokenizer
    from test_readme_commands import LLMPRESS, ROOT, fenced_blocks

    (block,) = [body for _, _, body in fenced_blocks((ROOT / "README.md").read_text()) if any(x.startswith("llama-") for x in body)]
    lines = [shlex.split(x, comments=True) for x in block if x.strip()]
    assert [a[0] for a in lines] == ["llmpress", "llmpress", "llama-perplexity", "llama-bench"]
    tok = tiny_tokenizer(vocab=320)
    model = TINY_MODELS["llama"](vocab=len(tok))
    model.config.max_position_embeddings = 8192
    model.save_pretrained(tmp_path / "alias", safe_serialization=True)
    tok.save_pretrained(tmp_path / "alias")
    env = {**os.environ, **shrink_env({"smollm2-135m": tmp_path / "alias"}), "OMP_NUM_THREADS": "1", "LD_LIBRARY_PATH": LIB}
    (tmp_path / "wiki.test.txt").write_text(TINY_TEXT * 40)  # the user's text file: enough tokens for a few 512-token chunks
    outs = []
    for argv in lines:
        exe = str(LLMPRESS) if argv[0] == "llmpress" else str(Path(LIB) / argv[0])
        res = subprocess.run([exe, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (argv, res.stdout[-3000:] + res.stderr[-3000:])
        outs.append(res.stdout + res.stderr)
    # the running estimate after each chunk goes to stdout; the last one is the final figure (the
    # "Final estimate" line goes through llama.cpp's log thread, which may not flush before exit)
    chunks = re.findall(r"\[(\d+)\]([\d.]+),", outs[2])
    assert len(chunks) > 1, outs[2][-3000:]
    ppl = float(chunks[-1][1])
    assert math.isfinite(ppl) and ppl > 1
    assert re.search(r"\|\s*tg\d+\s*\|\s*[\d.]+ ± [\d.]+", outs[3]), outs[3][-2000:]
