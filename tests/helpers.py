"""Small helpers shared by the test files (one copy each): error measures, logits, CLI refusals,
weight snapshots, a stored quantized linear. Models and fixtures live in conftest.py.

Every test folder imports these as ``from helpers import ...`` (tests/ is on ``sys.path``
because pytest puts the rootdir conftest.py's folder there)."""

from __future__ import annotations

import re

import torch

from llmpress.calib.engine import EngineOptions

QUIET = EngineOptions(progress=False)

# llmpress.progress's plain lines (stderr is not a terminal under pytest) and tqdm's bars
PROGRESS_LINE = re.compile(r"^[^:]+: +\d{1,3}% \d+/\d+ ")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius norms; a measurement, so outside autograd)."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def rel_max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, in float64."""
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``ids`` [batch, tokens], without gradients and without a KV cache."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def weights_copy(model) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``model.state_dict()``, to compare against after a step."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_cli(argv: list[str]) -> int:
    """``llmpress.cli.main(argv)``'s exit code, argparse's ``SystemExit`` included."""
    from llmpress.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def cli_fails(capsys, argv: list[str], *fragments: str, code: int = 2) -> str:
    """Run ``argv``: the exit code is ``code``, stderr is one line (progress lines aside) with no
    traceback holding every fragment, and a refusal (code 2) is ``llmpress: error: ...``."""
    rc = run_cli(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln) and "%|" not in ln]
    assert len(lines) == 1, err
    if code == 2:
        assert lines[0].startswith("llmpress: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def stored_linear(args, *, out: int, inp: int, act=None, bias: bool = False, seed: int = 0):
    """A random [out, inp] weight (std 0.05) quantized with ``args`` and encoded as the packed
    checkpoint stores it: (spec, tensors, dequantized weight, bias or None)."""
    from llmpress.export import codec
    from llmpress.quant.core import quantize_weight
    from llmpress.registry import ModuleRecord

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    wq, qp = quantize_weight(w, args)
    rec = ModuleRecord(name="l", out_features=out, in_features=inp, weight_args=args, qparams=qp, act_args=act)
    spec, t = codec.encode_linear(wq, rec)
    b = torch.randn(out, generator=g) if bias else None
    return spec, t, wq, b


def listing(folder) -> list[str]:
    """The sorted names in ``folder`` ([] when it does not exist): what a refused run left there."""
    from pathlib import Path

    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []
