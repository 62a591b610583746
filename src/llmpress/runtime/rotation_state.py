"""Save and restore the run-time part of a rotated model.

Rotations fold most of their work into weights, but the online pieces (Hadamard before
down_proj, on the attention output, on q/k per head, on gemma3's norm outputs) and the
KV-cache quantizers live in runtime modules whose buffers are not in the state dict. A
checkpoint of a rotated model holds the folded weights; loading it without these
modules gives wrong outputs. :func:`export_runtime` describes them (JSON) plus the
tensors of data-dependent rotations (DuQuant blocks, learned/random dense matrices);
:func:`import_runtime` re-attaches them to a model holding the saved (folded) weights.
Hadamard rotations carry no tensors (rebuilt from their size).

Found generically from the attachment attributes: ``llmpress_attn`` on attention modules,
``llmpress_down_in`` on MLPs, ``llmpress_out_rot`` on norms.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..arch import get_module
from ..quant.args import QuantArgs
from .kv_quant import attention_runtime
from .online_hadamard import OnlineRotation, attach_mlp_input, attach_output_rotation

FORMAT = "llmpress-rotation-runtime-v1"


def _rot_ref(rot: OnlineRotation | None, rots: dict, tensors: dict) -> str | None:
    if rot is None:
        return None
    if id(rot) in rots:
        return rots[id(rot)][0]
    key = f"r{len(rots)}"
    desc = {"kind": rot.kind, "n": rot.n}
    if rot.kind == "dense":
        tensors[f"{key}.m"] = rot.m.detach().cpu().contiguous()
    elif rot.kind == "blocks":
        tensors[f"{key}.r1"] = rot.r1.detach().cpu().contiguous()
        tensors[f"{key}.perm"] = rot.perm.detach().cpu().contiguous()
        tensors[f"{key}.r2"] = rot.r2.detach().cpu().contiguous()
    rots[id(rot)] = (key, desc)
    return key


def export_runtime(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(description, tensors) of every online rotation and KV quantizer attached to ``model``."""
    rots: dict[int, tuple[str, dict]] = {}
    tensors: dict[str, torch.Tensor] = {}
    attention, mlp_in, out_rot = {}, {}, {}
    for path, mod in model.named_modules():
        rt = getattr(mod, "llmpress_attn", None)
        if rt is not None and path and not path.endswith("llmpress_attn"):
            attention[path] = {
                "qk": _rot_ref(rt.qk_rot, rots, tensors),
                "o": _rot_ref(rt.o_rot, rots, tensors),
                "keys": rt.key_args.to_dict() if rt.key_args is not None else None,
                "values": rt.value_args.to_dict() if rt.value_args is not None else None,
            }
        rot = getattr(mod, "llmpress_down_in", None)
        if isinstance(rot, OnlineRotation) and "forward" in vars(mod):
            mlp_in[path] = {"rot": _rot_ref(rot, rots, tensors), "gate": mod.llmpress_gate, "up": mod.llmpress_up, "down": mod.llmpress_down}
        rot = getattr(mod, "llmpress_out_rot", None)
        if isinstance(rot, OnlineRotation):
            out_rot[path] = _rot_ref(rot, rots, tensors)
    desc = {
        "format": FORMAT,
        "rotations": {k: d for k, d in rots.values()},
        "attention": attention,
        "mlp_in": mlp_in,
        "out_rot": out_rot,
        "transforms": getattr(model, "llmpress_transforms", None),
    }
    return desc, tensors


def is_empty(desc: dict) -> bool:
    """True when :func:`export_runtime` found nothing attached (a model without a runtime)."""
    return not (desc["attention"] or desc["mlp_in"] or desc["out_rot"])


def tensor_names(desc: dict) -> set[str]:
    """Names of the tensors :func:`import_runtime` needs for ``desc``."""
    parts = {"hadamard": (), "dense": ("m",), "blocks": ("r1", "perm", "r2")}
    return {f"{key}.{p}" for key, d in desc["rotations"].items() for p in parts[d["kind"]]}


def summary(desc: dict) -> list[str]:
    """What ``desc`` holds, in words (one item per kind of site)."""
    att = desc["attention"].values()
    sites = {
        "q/k per head": sum(a["qk"] is not None for a in att),
        "o_proj input": sum(a["o"] is not None for a in att),
        "down_proj input": len(desc["mlp_in"]),
        "norm output": len(desc["out_rot"]),
    }
    out = []
    if any(sites.values()):
        out.append("online rotations (" + ", ".join(f"{k} x{v}" for k, v in sites.items() if v) + ")")
    kv = sum(a["keys"] is not None or a["values"] is not None for a in att)
    if kv:
        out.append(f"KV-cache quantizers ({kv} attention modules)")
    return out


def _build(key: str | None, desc: dict, tensors: dict, cache: dict) -> OnlineRotation | None:
    if key is None:
        return None
    if key not in cache:
        d = desc["rotations"][key]
        if d["kind"] == "hadamard":
            cache[key] = OnlineRotation(d["n"], "hadamard")
        elif d["kind"] == "dense":
            cache[key] = OnlineRotation(d["n"], "dense", matrix=tensors[f"{key}.m"])
        else:
            cache[key] = OnlineRotation(d["n"], "blocks", blocks=(tensors[f"{key}.r1"], tensors[f"{key}.perm"], tensors[f"{key}.r2"]))
    return cache[key]


def import_runtime(model: nn.Module, desc: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Re-attach what :func:`export_runtime` described to ``model`` (whose weights are already folded)."""
    if desc.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} description")
    tensors = tensors or {}
    cache: dict[str, OnlineRotation] = {}
    for path, a in desc["attention"].items():
        rt = attention_runtime(get_module(model, path))
        rt.qk_rot = _build(a["qk"], desc, tensors, cache)
        rt.o_rot = _build(a["o"], desc, tensors, cache)
        rt.key_args = QuantArgs.from_dict(a["keys"]) if a["keys"] else None
        rt.value_args = QuantArgs.from_dict(a["values"]) if a["values"] else None
    for path, m in desc["mlp_in"].items():
        attach_mlp_input(get_module(model, path), m["gate"], m["up"], m["down"], _build(m["rot"], desc, tensors, cache))
    for path, key in desc["out_rot"].items():
        attach_output_rotation(get_module(model, path), _build(key, desc, tensors, cache))
    if desc.get("transforms") is not None:
        model.llmpress_transforms = desc["transforms"]  # type: ignore[attr-defined]
