"""Helpers shared by the benchmark scripts: one loaded model, fixed windows, a results table."""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

from llmpress import api, models
from llmpress.eval.perplexity import perplexity


class Bench:
    """Loads a model once; each `run(recipe)` compresses a fresh copy and measures perplexity."""

    def __init__(self, model: str = "smollm2-135m", eval_windows: int = 64, calib_samples: int = 128, seqlen: int = 512, seed: int = 0,
                 fp_ppl: float | None = None):
        self.name = model
        self.model, self.tok = models.load(model)
        self.windows = api.evaluation_windows(self.tok, self.model, api.EvalConfig(seqlen=seqlen, max_windows=eval_windows))
        self.calib_cfg = api.CalibConfig(n_samples=calib_samples, seqlen=seqlen, seed=seed)
        self._calib = None
        self.rows: list[dict] = []
        t = time.perf_counter()
        # fp_ppl: the full-precision figure measured before on the same windows (saves an evaluation)
        self.fp_ppl = fp_ppl if fp_ppl is not None else perplexity(self.model, self.windows, progress=True, desc="fp32 ppl")
        self.add_row("full precision (fp32)" + (" (given)" if fp_ppl is not None else ""), self.fp_ppl, 32.0, time.perf_counter() - t, 0.0)

    @property
    def calib(self):
        if self._calib is None:
            self._calib = api.calibration_windows(self.tok, self.model, self.calib_cfg)
        return self._calib

    def add_row(self, label, ppl, bits, eval_s, compress_s, **extra):
        row = {"method": label, "ppl": ppl, "ratio": ppl / self.fp_ppl, "bits_per_weight": bits, "compress_s": compress_s, "eval_s": eval_s, **extra}
        self.rows.append(row)
        print(f"{label:<40} ppl {ppl:9.3f}  ratio {row['ratio']:6.3f}  bits {bits:6.3f}  compress {compress_s:7.1f}s", flush=True)
        return row

    def run(self, label: str, recipe, **extra):
        m = copy.deepcopy(self.model)
        t = time.perf_counter()
        from llmpress.registry import METHODS
        from llmpress.api import _as_recipe

        r = _as_recipe(recipe)
        needs = any(METHODS[s.method].needs or METHODS[s.method].scope != "module" for s in r.stages)
        rep = api.compress(m, r, self.calib if needs else None, tokenizer=self.tok, calib=self.calib_cfg)
        cs = time.perf_counter() - t
        t = time.perf_counter()
        ppl = perplexity(m, self.windows, progress=True, desc=label)
        row = self.add_row(label, ppl, rep.bits_per_weight, time.perf_counter() - t, cs, seconds=rep.seconds, **extra)
        del m
        return row

    def table(self) -> str:
        lines = [f"model {self.name}, {self.windows.shape[0]} test windows of {self.windows.shape[1]} tokens", "", "| method | ppl | ratio to fp32 | bits/weight | compress s |", "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['method']} | {r['ppl']:.3f} | {r['ratio']:.3f} | {r['bits_per_weight']:.3f} | {r['compress_s']:.1f} |")
        return "\n".join(lines)

    def save(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"model": self.name, "rows": self.rows}, indent=2, default=str))


def main_guard(fn):
    try:
        fn()
    except KeyboardInterrupt:
        sys.exit(130)


def forward_each(model, windows, hooks) -> None:
    """Run ``model`` on each window alone (no grad), then remove the hooks that watched it."""
    import torch

    try:
        with torch.no_grad():
            for i in range(windows.shape[0]):
                model(windows[i : i + 1])
    finally:
        for h in hooks:
            h.remove()
