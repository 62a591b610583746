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

import pytest
import torch
from conftest import random_windows
from test_gguf import _model, _packed, _tokenizer

from llmpress import checkpoint
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
    got = _llama_logits(llama_cpp, path, windows)
    assert got.shape == want.shape
    diff = (got - want).abs().max().item() / want.std().item()
    lw, lg = torch.log_softmax(want.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (lw.exp() * (lw - lg)).sum(-1).mean().item()
    top1 = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert diff < 0.05 and kl < 1e-3 and top1 >= 0.97, (diff, kl, top1)
    # and the comparison can fail: a file of other weights is far off
    other = export_gguf(_packed(tmp_path / "other", preset, model=_model().apply(_perturb))[0], tmp_path / "other.gguf")
    far = (_llama_logits(llama_cpp, other, windows) - want).abs().max().item() / want.std().item()
    assert far > 0.05


def _perturb(module):
    if isinstance(module, torch.nn.Linear) and module.out_features != len(_tokenizer()):
        with torch.no_grad():
            module.weight.mul_(-1.0)
