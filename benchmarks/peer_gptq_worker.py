"""llm-compressor's GPTQModifier on a local HF folder: run by benchmarks/gptq_vs_peer.py with
the peer's own virtual environment (benchmarks/.venv-peer). Imports nothing from llmpress.

    .venv-peer/bin/python peer_gptq_worker.py --model DIR --calib calib.npy --eval wiki=wiki.npy news=news.npy \
        --bits 4 --group-size 64 --out result.json

Times the whole ``oneshot`` call (wall clock), then measures perplexity on each set of
evaluation windows exactly as llmpress does: exp(mean cross-entropy of tokens 2..L), batches of 4.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True, nargs="+", help="one .npy of test windows per text (source=path or path)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--actorder", default="static", help="static (the peer's default), weight, or none")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = np.load(a.calib)
    evals = dict(e.split("=", 1) if "=" in e else (e, e) for e in a.eval)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": np.ones_like(calib).tolist()})
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=a.bits, type="int", symmetric=True, strategy="group", group_size=a.group_size),
    )
    modifier = GPTQModifier(
        config_groups={"group_0": scheme},
        ignore=["lm_head"],
        block_size=a.block_size,
        dampening_frac=a.damp,
        actorder=None if a.actorder == "none" else a.actorder,
    )
    t = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=[modifier],
        max_seq_length=calib.shape[1],
        num_calibration_samples=calib.shape[0],
        shuffle_calibration_samples=False,
    )
    wall = time.perf_counter() - t
    model.eval()
    t = time.perf_counter()
    ppl_by_source = {src: perplexity(model, torch.from_numpy(np.load(path)).long()) for src, path in evals.items()}
    ppl = next(iter(ppl_by_source.values()))
    result = {
        "tool": "llm-compressor 0.14.0.1 GPTQModifier",
        "bits": a.bits,
        "group_size": a.group_size,
        "actorder": a.actorder,
        "block_size": a.block_size,
        "damp": a.damp,
        "compress_s": wall,
        "eval_s": time.perf_counter() - t,
        "ppl": ppl,
        "ppl_by_source": ppl_by_source,
        "threads": torch.get_num_threads(),
        "calib_windows": list(calib.shape),
        "eval_windows": {src: list(np.load(path, mmap_mode="r").shape) for src, path in evals.items()},
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
