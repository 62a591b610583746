"""llmpress's GGUF files against llama.cpp's own quantizer, measured by llama.cpp (issue 21, parts 2-3).

    benchmarks/llamacpp_build.sh /work/llamacpp      # once: llama.cpp from the llama-cpp-python sdist
    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/gguf_llamacpp.py \
        --llama-cpp DIR/.../build/bin --llama-cpp-py DIR/llama_cpp_python-0.3.36:DIR/pylib \
        --out runs/bench/gguf-llamacpp.json

Files, all from the same full-precision model (the alias's safetensors folder):
- ``F32``: llama.cpp's ``convert_hf_to_gguf.py --outtype f32`` (the peer's own path), its
  ``tokenizer.ggml.pre`` set to the one llmpress's export writes for the same tokenizer, so
  every file splits text alike;
- llama.cpp ``llama-quantize`` of it to ``Q4_0`` and ``Q4_K_M``, each without and with an
  importance matrix from ``llama-imatrix`` on the same calibration windows llmpress uses
  (decoded to text);
- ``llmpress compress MODEL --recipe P --out DIR`` then ``llmpress export --format gguf DIR
  --out P.gguf`` for each preset (the command line, default flags).

Each file: its bytes; perplexity by llama.cpp's ``llama-perplexity`` (its convention: chunks
of 512 tokens, the second half of each scored) on each source's test windows decoded to text;
perplexity on llmpress's own token windows (every position scored, as ``llmpress eval``
does) through llama.cpp's library, with KL divergence from the F32 file's next-token
distribution (mean and 99th percentile) and top-1 agreement; prefill and decode tokens/s by
``llama-bench``. For llmpress's files also the largest logit difference and the KL between
llama.cpp running the GGUF and llmpress running the same checkpoint (part 2's check).
Rows are appended to the JSON as they finish; ``--table`` prints it; ``--speed-side-by-side N``
measures every file's speed again, in turns, N rounds (the comparable speed figures).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "llmpress"]


def sh(cmd: list, env: dict | None = None, log: Path | None = None) -> str:
    t = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    out = r.stdout + r.stderr
    if log is not None:
        log.write_text(out)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{out[-3000:]}")
    print(f"  {time.perf_counter() - t:7.1f}s  {' '.join(map(str, cmd))[:160]}", flush=True)
    return out


class LlamaCpp:
    """llama.cpp's tools (``bin``) and its library through the llama-cpp-python bindings."""

    def __init__(self, bin_dir: Path, py_path: str, threads: int):
        self.bin, self.threads = bin_dir, threads
        os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
        for p in reversed(py_path.split(":")):
            sys.path.insert(0, p)
        import llama_cpp

        self.mod = llama_cpp
        self.src = Path(py_path.split(":")[0]) / "vendor" / "llama.cpp"

    def tool(self, name: str, *args, log: Path | None = None) -> str:
        return sh([self.bin / name, *args], log=log)

    def load(self, path: Path, n_ctx: int):
        return self.mod.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=self.threads,
                              logits_all=True, verbose=False)  # fmt: skip

    @staticmethod
    def logits(llm, window: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(window)
        return torch.from_numpy(llm.scores[: len(window)].copy())


def window_stats(base_logp: torch.Tensor, other: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Summed NLL of ``other`` (logits) on tokens 2..L, per-position KL(base || other) from the
    base's log-probabilities, top-1 matches."""
    lb, lo = base_logp[:-1].float(), torch.log_softmax(other[:-1].float(), -1)
    nll = -lo.gather(1, tokens[1:, None]).sum().item()
    kl = (lb.exp() * (lb - lo)).sum(-1)
    top1 = (lb.argmax(-1) == lo.argmax(-1)).sum().item()
    return {"nll": nll, "kl": kl, "top1": top1, "n": tokens.numel() - 1}


def base_logprobs(cpp: LlamaCpp, path: Path, sets: dict, work: Path) -> dict:
    """The F32 file's next-token log-probabilities on every window, computed once for every
    file's KL, float16 in a file under ``work`` read back window by window (a memory map): 64
    windows x 512 x 49152 x 2 B = 3.2 GB per source for SmolLM2, 17 GB for gemma-3-270m's
    262144-token vocabulary, more than this machine's memory for three sources."""
    llm = cpp.load(path, n_ctx=next(iter(sets.values())).shape[1])
    n_vocab = llm.n_vocab()
    out = {}
    for src, windows in sets.items():
        file, shape = work / f"base-logprobs-{src}.f16", (len(windows), windows.shape[1], n_vocab)
        # a finished file is reused when the F32 file and the windows are the same (a resumed run)
        key = f"{path.stat().st_size} {path.stat().st_mtime_ns} {hashlib.sha256(windows.numpy().tobytes()).hexdigest()}"
        done = file.with_suffix(".done")
        if done.exists() and done.read_text() == key and file.stat().st_size == np.prod(shape) * 2:
            mm = np.memmap(file, dtype=np.float16, mode="r+", shape=shape)  # r+: torch wants writable memory
        else:
            done.unlink(missing_ok=True)
            mm = np.memmap(file, dtype=np.float16, mode="w+", shape=shape)
            for i, w in enumerate(windows):
                mm[i] = torch.log_softmax(cpp.logits(llm, w.tolist()), -1).half().numpy()
            mm.flush()
            done.write_text(key)
        out[src] = [torch.from_numpy(mm[i]) for i in range(len(windows))]
    del llm
    return out


def score_file(cpp: LlamaCpp, path: Path, base: dict, sets: dict) -> dict:
    """Perplexity on llmpress's windows, KL from the F32 file and top-1 agreement, per source."""
    llm = cpp.load(path, n_ctx=next(iter(sets.values())).shape[1])
    out = {}
    for src, windows in sets.items():
        nll, n, top1, kls = 0.0, 0, 0, []
        for w, lb in zip(windows, base[src]):
            s = window_stats(lb, cpp.logits(llm, w.tolist()), w)
            nll, n, top1 = nll + s["nll"], n + s["n"], top1 + s["top1"]
            kls.append(s["kl"])
        kl = torch.cat(kls)
        out[src] = {"ppl": float(torch.tensor(nll / n).exp()), "kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item(),
                    "top1": top1 / n}  # fmt: skip
    del llm
    return out


def llama_perplexity(cpp: LlamaCpp, path: Path, texts: dict, chunks: int, work: Path) -> dict:
    out = {}
    for src, txt in texts.items():
        log = cpp.tool("llama-perplexity", "-m", path, "-f", txt, "-c", 512, "--chunks", chunks, "-t", cpp.threads, "-b", 512)
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
        # the running value after the last chunk (stdout) is the final estimate; llama.cpp's
        # asynchronous logger can exit before it writes the "Final estimate" line (stderr)
        running = re.findall(r"\[(\d+)\]([0-9.]+),", log)
        if m is None and not running:
            raise SystemExit(f"no perplexity in llama-perplexity's output for {path}:\n{log[-2000:]}")
        out[src] = float(m.group(1)) if m is not None else float(running[-1][1])
    return out


def bench_speed(cpp: LlamaCpp, path: Path, reps: int = 3) -> dict:
    """Prefill (512 tokens) and decode (128 tokens) tokens/s by ``llama-bench``, ``reps`` repetitions."""
    raw = cpp.tool("llama-bench", "-m", path, "-p", 512, "-n", 128, "-t", cpp.threads, "-r", reps, "-o", "json")
    speed = {}
    for r in json.loads(raw[raw.index("[") : raw.rindex("]") + 1]):
        speed["prefill_tok_s" if r.get("n_prompt", 0) > 0 else "decode_tok_s"] = r["avg_ts"]
    return speed


def speed_side_by_side(cpp: LlamaCpp, rows: list[dict], rounds: int) -> None:
    """Every file's ``llama-bench`` speeds measured in turns, ``rounds`` times (one repetition
    each), the median kept in ``row["speed"]``: the files then share the machine's load, so the
    ratios hold on a busy machine where a row's own figure (taken when that row ran) does not."""
    runs: dict[str, list[dict]] = {r["file"]: [] for r in rows}
    for _ in range(rounds):
        for r in rows:
            runs[r["file"]].append(bench_speed(cpp, Path(r["path"]), reps=1))
    for r in rows:
        r["speed"] = {k: statistics.median(x[k] for x in runs[r["file"]]) for k in ("prefill_tok_s", "decode_tok_s")}
        r["speed"]["rounds"] = rounds


def llmpress_vs_llamacpp(cpp: LlamaCpp, gguf_path: Path, ckpt: Path, windows: torch.Tensor) -> dict:
    """llama.cpp running the exported GGUF against llmpress running the checkpoint it came from."""
    from llmpress import checkpoint

    model, _ = checkpoint.load_compressed(ckpt)
    llm = cpp.load(gguf_path, n_ctx=windows.shape[1])
    worst, kls, top1, n = 0.0, [], 0, 0
    for w in windows:
        with torch.no_grad():
            ours = model(w[None]).logits[0].float()
        theirs = cpp.logits(llm, w.tolist())
        worst = max(worst, (ours - theirs).abs().max().item() / ours.std().item())
        s = window_stats(torch.log_softmax(ours, -1), theirs, w)
        kls.append(s["kl"])
        top1, n = top1 + s["top1"], n + s["n"]
    return {"max_abs_logit_diff_over_std": worst, "kl_mean": torch.cat(kls).mean().item(), "top1": top1 / n}


def write_text(tok, windows: torch.Tensor, path: Path) -> Path:
    """The windows decoded back to text, one after the other (llama.cpp's tools re-tokenize it)."""
    if not path.exists():
        path.write_text("".join(tok.decode(w, skip_special_tokens=True) for w in windows))
    return path


def llmpress_file(model: str, preset: str, calib_samples: int, work: Path) -> tuple[Path, Path]:
    """``llmpress compress`` then ``llmpress export --format gguf``: the user's two commands."""
    ckpt, out = work / preset, work / f"{preset}.gguf"
    if not out.exists():
        sh([*CLI, "compress", model, "--recipe", preset, "--out", ckpt, "--no-eval", "--no-progress", "--overwrite",
            "--calib-samples", calib_samples])  # fmt: skip
        sh([*CLI, "export", "--format", "gguf", ckpt, "--out", out, "--overwrite"])
    return out, ckpt


def base_file(cpp: LlamaCpp, folder: Path, tok: dict, work: Path) -> Path:
    """F32 GGUF by llama.cpp's converter with llmpress's tokenizer metadata (``tok``, what
    ``tokenizer_metadata`` gives): a byte-level BPE file gets llmpress's pre-tokenizer name; a
    SentencePiece-style tokenizer.json without tokenizer.model (gemma3-270m) goes through
    ``llamacpp_convert.py``, which writes llmpress's vocabulary in the converter's place."""
    raw, out = work / "f32-converted.gguf", work / "F32.gguf"
    if not out.exists():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path[:2], *filter(None, [os.environ.get("PYTHONPATH")])])}
        if tok["model"] == "llama":
            sh([sys.executable, REPO / "benchmarks" / "llamacpp_convert.py", cpp.src, folder, "--outtype", "f32", "--outfile", out], env=env)
            return out
        sh([sys.executable, cpp.src / "convert_hf_to_gguf.py", folder, "--outtype", "f32", "--outfile", raw], env=env)
        sh([sys.executable, cpp.src / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py", raw, out, "--pre-tokenizer", tok["pre"], "--force"],
           env={**env, "PYTHONPATH": f"{cpp.src / 'gguf-py'}{os.pathsep}{env['PYTHONPATH']}"})  # fmt: skip
        raw.unlink()
    return out


def peer_files(cpp: LlamaCpp, base: Path, calib_txt: Path, types: list[str], calib_samples: int, work: Path) -> dict:
    """llama-quantize to each type, without and with an importance matrix on the calibration text."""
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists():
        cpp.tool("llama-imatrix", "-m", base, "-f", calib_txt, "-o", imatrix, "-c", 512, "--chunks", calib_samples, "-t", cpp.threads,
                 log=work / "imatrix.log")  # fmt: skip
    files = {}
    for t in types:
        for use in (False, True):
            out = work / f"llama-{t}{'-imatrix' if use else ''}.gguf"
            if not out.exists():
                cpp.tool("llama-quantize", *(["--imatrix", imatrix] if use else []), base, out, t, cpp.threads)
            files[f"llama.cpp {t}" + (" + imatrix" if use else "")] = out
    return files


def table(rows: list[dict]) -> str:
    srcs, lsrcs = list(rows[0]["ppl"]), list(rows[0]["llama_perplexity"])
    speed = any(r.get("speed") for r in rows)
    base = rows[0]
    head = ("| file | bytes | " + " | ".join(f"{s} ppl (x F32)" for s in srcs) + " | KL mean / p99 (wiki) | top-1 (wiki) | "
            + " | ".join(f"llama-perplexity {s}" for s in lsrcs) + " |" + (" prefill / decode tok/s |" if speed else ""))  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r['ppl'][s]['ppl']:.3f} ({r['ppl'][s]['ppl'] / base['ppl'][s]['ppl']:.3f}x)" for s in srcs]
        w = r["ppl"][srcs[0]]
        sp = r.get("speed") or {}
        lines.append(f"| {r['file']} | {r['bytes']:,} | " + " | ".join(cells) + f" | {w['kl_mean']:.4f} / {w['kl_p99']:.3f} | {w['top1']:.3f} | "
                     + " | ".join(f"{r['llama_perplexity'][s]:.3f}" for s in lsrcs)
                     + " |" + (f" {sp.get('prefill_tok_s', 0):.0f} / {sp.get('decode_tok_s', 0):.1f} |" if speed else ""))  # fmt: skip
    checks = [f"- {r['file']}: llama.cpp vs llmpress on the same checkpoint: max |logit diff| / std {r['vs_llmpress']['max_abs_logit_diff_over_std']:.4f}, "
              f"KL {r['vs_llmpress']['kl_mean']:.2e}, top-1 {r['vs_llmpress']['top1']:.4f}" for r in rows if r.get("vs_llmpress")]  # fmt: skip
    return "\n".join(lines + [""] + checks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--llama-cpp", type=Path, help="folder of llama.cpp's binaries and libllama.so (llamacpp_build.sh prints it)")
    ap.add_argument("--llama-cpp-py", help="PYTHONPATH entries for the llama_cpp bindings (llamacpp_build.sh prints them)")
    ap.add_argument("--presets", default="gptq-q4_0,awq-gptq-q4_0,rtn-q4_0")
    ap.add_argument("--peer-types", default="Q4_0,Q4_K_M")
    ap.add_argument("--sources", default="wiki,news,code")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--check-windows", type=int, default=4, help="windows for the llama.cpp-vs-llmpress logit check")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--perplexity-sources", type=int, default=1, help="sources (the first N) also scored by llama-perplexity")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "gguf")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "gguf-llamacpp.json")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--speed-side-by-side", type=int, default=0, metavar="ROUNDS",
                    help="measure every file of --out again in turns (medians of ROUNDS) and stop")  # fmt: skip
    a = ap.parse_args()
    rows = json.loads(a.out.read_text()) if a.out.exists() else []
    if a.table:
        print(table(rows))
        return
    if a.speed_side_by_side:
        speed_side_by_side(LlamaCpp(a.llama_cpp, a.llama_cpp_py, a.threads), rows, a.speed_side_by_side)
        a.out.write_text(json.dumps(rows, indent=1))
        print(table(rows))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import eval_sets

    from llmpress import api, models
    from llmpress.export.gguf import tokenizer_metadata

    cpp = LlamaCpp(a.llama_cpp, a.llama_cpp_py, a.threads)
    work = a.work / Path(a.model).name  # an alias, or a folder's name (never the folder itself)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = models.load(a.model)
    folder = models.packaged_folder(a.model) if not Path(a.model).exists() else Path(a.model)
    model_vocab = model.config.vocab_size
    sets = eval_sets(tok, model, a.sources, a.eval_windows)
    calib = api.calibration_windows(tok, model, api.CalibConfig(n_samples=a.calib_samples))
    del model
    texts = {s: write_text(tok, w, work / f"test-{s}.txt") for s, w in sets.items()}
    calib_txt = write_text(tok, calib, work / "calib.txt")
    ours = {f"llmpress {p}": llmpress_file(a.model, p, a.calib_samples, work) for p in a.presets.split(",")}
    base = base_file(cpp, folder, tokenizer_metadata(folder, model_vocab), work)
    peers = peer_files(cpp, base, calib_txt, a.peer_types.split(","), a.calib_samples, work)
    ordered = [*(v for k, v in peers.items() if "imatrix" in k), *(v for k, v in peers.items() if "imatrix" not in k)]
    mine = [v[0] for v in ours.values()]
    names = {v: k for k, v in peers.items()} | {v[0]: k for k, v in ours.items()}
    files = {"F32 (llama.cpp convert_hf_to_gguf)": base}  # then llmpress's and llama.cpp's files in turn, imatrix ones first
    for i in range(max(len(ordered), len(mine))):
        files |= {names[p]: p for p in (mine[i : i + 1] + ordered[i : i + 1])}
    base_lp = base_logprobs(cpp, base, sets, work)
    done = {r["file"] for r in rows}
    for label, path in files.items():
        if label in done:
            continue
        print(label, flush=True)
        t = time.perf_counter()
        row = {"file": label, "path": str(path), "bytes": path.stat().st_size, "ppl": score_file(cpp, path, base_lp, sets),
               "llama_perplexity": llama_perplexity(cpp, path, {s: texts[s] for s in list(texts)[: a.perplexity_sources]}, a.eval_windows, work)}  # fmt: skip
        if label in ours:
            row["vs_llmpress"] = llmpress_vs_llamacpp(cpp, path, ours[label][1], sets[next(iter(sets))][: a.check_windows])
        if not a.no_speed:
            row["speed"] = bench_speed(cpp, path)
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=1))
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
