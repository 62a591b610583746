"""Peak RSS of a compress through the Python API, with and without the engine's per-layer
``malloc_trim`` (docs/codebooks.md, Memory).

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/compress_memory.py --recipe gptvq-4d-w2 --calib 16 [--no-trim]

Loads the model and the calibration windows, trims malloc, prints the RSS (the start), runs
``api.compress`` with the recipe, and prints the process's peak RSS (VmHWM) and the RSS after
the compress, after ``malloc_trim`` and after ``gc.collect()``. ``--no-trim`` replaces the
engine's per-layer trim with a no-op: the behaviour before it.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import main_guard  # noqa: E402


def _status_mb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return -1


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="gptvq-4d-w2")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--no-trim", action="store_true", help="without the engine's malloc_trim after each linear")
    a = ap.parse_args(argv)
    from llmpress import api, models
    from llmpress.eval.memory import trim_malloc

    if a.no_trim:
        import llmpress.calib.block as block

        block.trim_malloc = lambda: None
    model, tok = models.load(a.model)
    cfg = api.CalibConfig(n_samples=a.calib, seqlen=512, seed=0)
    windows = api.calibration_windows(tok, model, cfg)
    trim_malloc()
    start = _status_mb("VmRSS")
    api.compress(model, a.recipe, windows, tokenizer=tok, calib=cfg)
    res = {
        "recipe": a.recipe,
        "calib": a.calib,
        "trim": not a.no_trim,
        "start_mb": start,
        "peak_mb": _status_mb("VmHWM"),
        "after_mb": _status_mb("VmRSS"),
    }
    trim_malloc()
    res["after_trim_mb"] = _status_mb("VmRSS")
    res["gc_objects"] = gc.collect()
    res["after_gc_mb"] = _status_mb("VmRSS")
    print(res, flush=True)
    return res


if __name__ == "__main__":
    main_guard(main)
