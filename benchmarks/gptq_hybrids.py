"""Which layers cost GPTQ its quality off the calibration text? Swap groups of layers back to RTN.

Compresses SmolLM2 once with a GPTQ variant (benchmarks/domains.py VARIANTS), computes RTN on
the same grid from the full-precision weights, and measures perplexity with each group of
layers taken from RTN instead of GPTQ (v_proj, q/k/v, o_proj, gate/up, down_proj, ...).

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/gptq_hybrids.py --json runs/gptq_hybrids.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from domains import VARIANTS, W4  # noqa: E402

from llmpress import QuantArgs, api, models  # noqa: E402
from llmpress.calib.engine import EngineOptions  # noqa: E402
from llmpress.eval.perplexity import perplexity  # noqa: E402
from llmpress.quant.core import fake_quantize  # noqa: E402

GROUPS = {
    "none": (),
    "v_proj": ("v_proj",),
    "q/k/v": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate/up": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variant", default="gptq-act-order")
    ap.add_argument("--eval", default="wiki,code")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    model, tok = models.load(a.model)
    windows = {s: api.evaluation_windows(tok, model, api.EvalConfig(source=s, max_windows=a.eval_windows)) for s in a.eval.split(",")}
    args = QuantArgs(**W4)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    rtn = {n: fake_quantize(model.get_submodule(n).weight.data, args) for n in names}
    recipe, eng = VARIANTS[a.variant]
    calib = api.calibration_windows(tok, model, api.CalibConfig(source="wiki"))
    gq = copy.deepcopy(model)
    api.compress(gq, recipe, calib, tokenizer=tok, engine=EngineOptions(progress=False, **eng))
    gptq_w = {n: gq.get_submodule(n).weight.data.clone() for n in names}
    res = {"variant": a.variant, "rows": {}}
    for label in a.groups.split(","):
        suffixes = GROUPS[label]
        for n in names:
            gq.get_submodule(n).weight.data.copy_(rtn[n] if n.endswith(suffixes) and suffixes else gptq_w[n])
        res["rows"][label] = {s: perplexity(gq, w, 1) for s, w in windows.items()}
        print(f"RTN in {label:10s}: " + ", ".join(f"{s} {v:.3f}" for s, v in res["rows"][label].items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
