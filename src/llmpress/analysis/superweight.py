"""Super weights (Yu et al. 2024, "The Super Weight in Large Language Models").

Run one short prompt; at every MLP down projection Y = X W^T record the input and the
output. The layer whose output spikes (largest |Y| across layers, well above the
other layers) holds the super weight: row = output channel of the spike, column =
input channel of the spike at the same token (:func:`detect.super_weight_candidate`).
Remove it (set to 0), run again, repeat until the largest down-projection activation
is gone (below ``sw_stop_ratio`` of the first one) or no layer spikes any more. The
model's weights are restored before returning.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..arch import ArchSpec, blocks, get_arch, get_module
from . import detect
from .collect import backbone

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."


@dataclass(kw_only=True)
class SuperWeight:
    layer: int
    module: str  # full dotted path of the down projection
    row: int
    col: int
    weight: float
    token: int
    output: float  # the spike Y[token, row] when found
    input: float  # X[token, col]
    share: float  # X[token, col] * W[row, col] / Y[token, row]

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_ids(tokenizer, model, prompt: str) -> torch.Tensor:
    """Token ids [1, n] of ``prompt``, with BOS first when the architecture needs it."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    try:
        needs = get_arch(model).needs_bos
    except Exception:
        needs = False
    bos = tokenizer.bos_token_id
    if needs and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def down_proj_io(model: nn.Module, input_ids: torch.Tensor, spec: ArchSpec | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(X, Y) [tokens, .] of every down projection for the first sequence of ``input_ids``."""
    spec = spec or get_arch(model)
    cap: dict[int, tuple] = {}
    hs = []
    for li, blk in enumerate(blocks(model, spec)):
        mod = get_module(blk, spec.down)
        hs.append(
            mod.register_forward_hook(lambda m, i, o, li=li: cap.__setitem__(li, (i[0][0].detach().float().cpu(), o[0].detach().float().cpu())))
        )
    try:
        backbone(model)(input_ids=input_ids[:1].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return [cap[i] for i in range(len(cap))]


@torch.no_grad()
def find_super_weights(model: nn.Module, input_ids: torch.Tensor, thresholds: detect.Thresholds = detect.DEFAULT) -> dict:
    """Iterative super weight search; returns {"super_weights": [...], "iterations": [...]}.

    Each iteration lists the max |input| and max |output| of every down projection
    (the spike profile), the candidate, and whether the search stops.
    """
    spec = get_arch(model)
    blks = blocks(model, spec)
    removed: list[tuple[SuperWeight, float]] = []
    iterations = []
    first_max = None
    try:
        for it in range(thresholds.sw_max_iters + 1):
            io = down_proj_io(model, input_ids, spec)
            out_max = [float(y.abs().max()) for _, y in io]
            in_max = [float(x.abs().max()) for x, _ in io]
            top = max(out_max)
            first_max = top if first_max is None else first_max
            rec = {"iteration": it, "down_in_max": in_max, "down_out_max": out_max, "largest": top}
            iterations.append(rec)
            li = detect.spike(out_max, thresholds.sw_spike_factor, thresholds.sw_min)
            if li is None:
                rec["stop"] = "no down_proj output spike"
                break
            if it > 0 and top < thresholds.sw_stop_ratio * first_max:
                rec["stop"] = f"largest down_proj output {top:.1f} < {thresholds.sw_stop_ratio} x the first ({first_max:.1f})"
                break
            if it == thresholds.sw_max_iters:
                rec["stop"] = "iteration limit"
                break
            x, y = io[li]
            mod = get_module(blks[li], spec.down)
            done = {(s.row, s.col) for s, _ in removed if s.layer == li}
            cand = detect.super_weight_candidate(x, y, mod.weight.detach().cpu(), exclude=done)
            sw = SuperWeight(
                layer=li,
                module=f"{spec.blocks}.{li}.{spec.down}",
                row=cand.row,
                col=cand.col,
                weight=cand.weight,
                token=cand.token,
                output=cand.output,
                input=cand.input,
                share=cand.share,
            )
            rec["candidate"] = sw.to_dict()
            removed.append((sw, float(mod.weight[cand.row, cand.col])))
            mod.weight[cand.row, cand.col] = 0.0
            log.info(
                "super weight candidate %s[%d, %d] = %.4g (output spike %.4g at token %d)", sw.module, sw.row, sw.col, sw.weight, sw.output, sw.token
            )
    finally:
        for sw, old in reversed(removed):
            get_module(blks[sw.layer], spec.down).weight[sw.row, sw.col] = old
    return {"super_weights": [s.to_dict() for s, _ in removed], "iterations": iterations}


@contextlib.contextmanager
def weights_zeroed(model: nn.Module, super_weights: list[dict]):
    """Temporarily set the given super weights to zero."""
    spec = get_arch(model)
    blks = blocks(model, spec)
    saved = []
    try:
        with torch.no_grad():
            for s in super_weights:
                w = get_module(blks[s["layer"]], spec.down).weight
                saved.append((w, s["row"], s["col"], w[s["row"], s["col"]].clone()))
                w[s["row"], s["col"]] = 0.0
        yield
    finally:
        with torch.no_grad():
            for w, r, c, v in reversed(saved):
                w[r, c] = v
