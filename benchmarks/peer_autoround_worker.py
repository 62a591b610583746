"""Intel's AutoRound (auto-round 0.16.1) on a local HF folder: run by benchmarks/learned.py with
the peer's own virtual environment (benchmarks/peer_autoround.sh DIR). Imports nothing from llmpress.

    DIR/bin/python peer_autoround_worker.py --model FOLDER --calib calib.safetensors \
        --bits 4 --group-size 64 --iters 200 --out OUT

``calib.safetensors`` holds one int64 tensor ``input_ids`` (windows x tokens): the calibration
windows llmpress draws, handed over so both tools see the same ones (AutoRound's ``nsamples``
and ``seqlen`` are set to their count and length, ``batch_size`` to min(8, count)). AutoRound
runs W{bits} g{group} symmetric on every Linear of the decoder blocks (its default leaves
lm_head alone), with ``iters`` SignSGD steps per block (``lr``: AutoRound's own default
unless given; its "light" recipe is iters 50, lr 5e-3). Its result is kept fake-quantized:
the dequantized weight of every quantized linear. Writes

- ``OUT/weights.safetensors``: ``{linear name}.weight`` -> the fake-quantized weight (float32);
- ``OUT/result.json``: the tool's version, the settings, ``compress_s`` (wall time of the
  AutoRound constructor and ``quantize()``, model loading excluded; with ``--compile auto``
  its torch.compile is on and its compile time is inside), the linears quantized.
"""

import argparse
import json
import time
from pathlib import Path

import torch


def fake_quant_weights(model) -> dict:
    """name.weight -> float32 weight of each Linear AutoRound quantized (its own test,
    ``check_to_quantized``: bits <= 8); quantize() leaves the dequantized values in place when
    no export format is asked. Other weights (lm_head, embeddings: AutoRound may hold them in
    bfloat16) are not handed back."""
    from auto_round.utils.model import check_to_quantized

    return {f"{n}.weight": m.weight.detach().float().cpu().contiguous()
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and hasattr(m, "bits") and check_to_quantized(m)}  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="HF folder of the full-precision model")
    ap.add_argument("--calib", required=True, help="safetensors file with input_ids (windows x tokens)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=200, help="SignSGD steps per block (AutoRound's default 200)")
    ap.add_argument("--lr", type=float, default=None, help="AutoRound's learning rate (default: its own, 1/iters)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="AutoRound's torch.compile (auto: its default)")
    ap.add_argument("--out", required=True, help="folder of weights.safetensors and result.json")
    a = ap.parse_args()

    import auto_round
    from auto_round import AutoRound
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(a.calib)["input_ids"].long()
    n, seqlen = ids.shape
    bs = min(8, n)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    before = {name: m.weight.detach().float().clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    compile_ = {"auto": None, "on": True, "off": False}[a.compile]
    batches = [ids[i : i + bs] for i in range(0, n, bs)]
    kw = {} if a.lr is None else {"lr": a.lr}
    t = time.perf_counter()
    ar = AutoRound(model, tok, bits=a.bits, group_size=a.group_size, sym=True, iters=a.iters, nsamples=n, seqlen=seqlen, batch_size=bs,
                   dataset=batches, device_map="cpu", seed=a.seed, enable_torch_compile=compile_, **kw)  # fmt: skip
    ar.quantize()
    wall = time.perf_counter() - t
    weights = fake_quant_weights(model)
    changed = [k for k, w in weights.items() if not torch.equal(w, before[k.removesuffix(".weight")])]
    if not changed:
        raise SystemExit("AutoRound changed no quantized Linear's weight: nothing to evaluate (did quantize() pack the layers instead?)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "weights.safetensors"))
    result = {
        "tool": f"auto-round {auto_round.__version__}",
        "bits": a.bits,
        "group_size": a.group_size,
        "sym": True,
        "iters": a.iters,
        "lr": a.lr,
        "seed": a.seed,
        "calib_windows": [n, seqlen],
        "batch_size": bs,
        "compress_s": wall,
        "torch_compile": a.compile,
        "threads": torch.get_num_threads(),
        "linears": sorted(k.removesuffix(".weight") for k in weights),
        "linears_not_quantized": sorted(set(before) - {k.removesuffix(".weight") for k in weights}),
        "linears_unchanged": sorted(k.removesuffix(".weight") for k in set(weights) - set(changed)),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("linears")}))


if __name__ == "__main__":
    main()
