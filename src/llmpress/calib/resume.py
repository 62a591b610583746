"""Resume a compress after a crash: what each finished decoder block left, kept on disk.

After block i is compressed the engine writes, each file atomically (temporary name, then
rename), into the run's checkpoint folder:

- ``block-i.safetensors``: the block's tensors (activation-quantization wrappers under the
  plain linears' names) and the tensors of its linears' records (qparams, g_idx, payload).
  A weight on an integer grid is kept as its packed codes (``codes.<name>``, 4 bits per
  weight at W4 instead of 32) when dequantizing them with the record's scales gives back
  the weight bit for bit, which is checked as it is written; any other weight stays float;
- ``inputs-(i+1)-b.safetensors``, one per calibration batch b: the block's outputs, the next
  block's inputs (one file per batch, so writing holds one batch's bytes at a time; the
  previous block's inputs are then removed: one set of activations on disk);
- ``block-i.json`` last: the records' other fields. Its presence marks the block done.

``run.json`` names what the folder belongs to (the recipe, the calibration windows'
fingerprint, the model's shapes); a resume with anything else is refused. A resumed run
re-runs the model-scope stages (deterministic), loads blocks 0..k, wraps their
activation quantizers from the records, and continues at block k+1 with the saved inputs,
so it produces the uninterrupted run's result bit for bit. Stages that change a block's
module structure beyond those wrappers (LLM.int8()'s linears, SmoothQuant's ``shift``,
OmniQuant's shifts) are
refused for resume before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..io_safety import atomic_file, write_atomic
from ..quant.args import QuantArgs
from ..quant.core import QParams, dequantize, quantize
from ..quant.pack import pack_codes, unpack_codes
from ..registry import ModuleRecord
from ..runtime.act_quant import plain_state_dict

FORMAT = "llmpress-resume-v2"
_TENSOR = "__tensor__"


def record_state(rec: ModuleRecord) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able fields, tensors) of a record; :func:`record_from_state` inverts it exactly."""
    tensors: dict[str, torch.Tensor] = {}

    def keep(key: str, v):
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().cpu().contiguous()
            return {_TENSOR: key}
        if isinstance(v, dict):
            return {k: keep(f"{key}.{k}", x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [keep(f"{key}.{i}", x) for i, x in enumerate(v)]
        return v

    qp = rec.qparams
    meta = {
        "name": rec.name, "out_features": rec.out_features, "in_features": rec.in_features, "methods": list(rec.methods),
        "weight_args": rec.weight_args.to_dict() if rec.weight_args else None,
        "act_args": rec.act_args.to_dict() if rec.act_args else None,
        "qparams": None if qp is None else keep("qparams", {"scale": qp.scale, "zero_point": qp.zero_point, "threshold": qp.threshold}),
        "sparsity": rec.sparsity, "notes": keep("notes", rec.notes), "form": rec.form, "payload": keep("payload", rec.payload),
    }  # fmt: skip
    return meta, tensors


def record_from_state(meta: dict, tensors: dict[str, torch.Tensor]) -> ModuleRecord:
    def back(v):
        if isinstance(v, dict):
            return tensors[v[_TENSOR]] if set(v) == {_TENSOR} else {k: back(x) for k, x in v.items()}
        if isinstance(v, list):
            return [back(x) for x in v]
        return v

    qp = back(meta["qparams"]) if meta["qparams"] is not None else None
    return ModuleRecord(
        name=meta["name"], out_features=meta["out_features"], in_features=meta["in_features"], methods=list(meta["methods"]),
        weight_args=QuantArgs.from_dict(meta["weight_args"]) if meta["weight_args"] else None,
        act_args=QuantArgs.from_dict(meta["act_args"]) if meta["act_args"] else None,
        qparams=None if qp is None else QParams(scale=qp["scale"], zero_point=qp["zero_point"], threshold=qp["threshold"]),
        sparsity=meta["sparsity"], notes=back(meta["notes"]), form=meta["form"], payload=back(meta["payload"]),
    )  # fmt: skip


def check_resumable(recipe, ranks: int = 1) -> None:
    """Refuse checkpoints (and so --resume) for what a block checkpoint cannot rebuild."""
    for i, st in enumerate(recipe.stages):
        shifts = (st.method == "smoothquant" and getattr(st.config, "shift", False)) or (
            st.method == "omniquant" and getattr(st.config, "shift_on", False)
        )
        if st.method == "llm_int8" or shifts:
            what = "LLM.int8()'s linears" if st.method == "llm_int8" else f"{st.method}'s shifts (norm wrappers, added biases)"
            raise UserError(
                f"--resume: recipe stage {i} ({st.method}) changes the block's modules ({what}), which a block checkpoint does not rebuild"
            )
        if getattr(st.config, "needs_fp_stream", False):
            raise UserError(
                f"--resume: recipe stage {i} ({st.method}) needs the full-precision stream of block inputs, which a block checkpoint does not keep"
            )
    if ranks > 1:
        raise UserError("--resume: not with several processes yet (each rank would keep its own activations)")


def fingerprint(model: nn.Module, recipe_dict: dict, calib: torch.Tensor) -> dict:
    """What a checkpoint folder belongs to: the recipe, the calibration windows, the model's shapes."""
    shapes = hashlib.sha256(json.dumps([(n, list(p.shape)) for n, p in model.state_dict().items()]).encode()).hexdigest()
    windows = hashlib.sha256(calib.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return {"format": FORMAT, "recipe": recipe_dict, "calibration_windows": windows, "model_shapes": shapes}


class BlockCheckpoints:
    """The checkpoint folder of one run (see the module doc)."""

    def __init__(self, folder: str | os.PathLike, run: dict):
        self.folder = Path(folder)
        self.run = run

    def start(self, resume: bool) -> int:
        """Prepare the folder; the index of the last finished block to resume after (-1: none)."""
        meta = self.folder / "run.json"
        if resume and meta.exists():
            if json.loads(meta.read_text()) != json.loads(json.dumps(self.run)):
                raise UserError(
                    f"--resume: {self.folder} belongs to another run (recipe, calibration windows or model differ); remove it or run without --resume"
                )
            return self.last_done()
        if self.folder.exists():
            for f in self.folder.iterdir():
                f.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(meta, json.dumps(self.run, indent=1))
        return -1

    def last_done(self) -> int:
        done = sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("block-*.json"))
        k = -1
        for i in done:  # contiguous from 0
            if i != k + 1:
                break
            k = i
        return k

    def save(self, i: int, block: nn.Module, prefix: str, records: dict[str, ModuleRecord], outputs) -> None:

        state = {f"block.{k}": v.detach().cpu().contiguous() for k, v in plain_state_dict(block).items()}
        metas = {}
        for name in sorted(n for n in records if n.startswith(prefix + ".")):
            meta, tensors = record_state(records[name])
            metas[name] = meta
            state.update({f"records.{name}.{k}": v for k, v in tensors.items()})
            key = f"block.{name[len(prefix) + 1 :]}.weight"
            parts = _grid_codes(state.get(key), records[name])
            if parts is not None:
                state.update({f"{part}.{key}": v for part, v in parts.items()})
                del state[key]
        _save(self.folder / f"block-{i}.safetensors", _untie(state))
        if outputs is not None:
            for j in range(len(outputs)):
                _save(self.folder / f"inputs-{i + 1}-{j}.safetensors", {"x": outputs[j].detach().cpu().contiguous()})
        write_atomic(self.folder / f"block-{i}.json", json.dumps({"batches": len(outputs) if outputs is not None else 0, "records": metas}))
        for f in self.folder.glob(f"inputs-{i}-*.safetensors"):
            f.unlink()

    def restore(self, i: int, block: nn.Module, prefix: str) -> dict[str, ModuleRecord]:
        """Load block i's tensors into ``block`` (plain linears); its records."""
        from safetensors.torch import load_file

        t = load_file(str(self.folder / f"block-{i}.safetensors"))
        metas = json.loads((self.folder / f"block-{i}.json").read_text())["records"]
        for k in [k for k in t if k.startswith("codes.")]:
            key = k[len("codes.") :]
            name = prefix + "." + key[len("block.") : -len(".weight")]
            rec = record_from_state(metas[name], _record_tensors(t, name))
            t[key] = _from_codes({part: t.pop(f"{part}.{key}") for part in ("codes", "negzero") if f"{part}.{key}" in t}, rec)
        state = {k[len("block.") :]: v for k, v in t.items() if k.startswith("block.")}
        missing, unexpected = block.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"--resume: {self.folder}/block-{i}.safetensors does not match the model's block {i} ({(missing + unexpected)[:3]})")
        return {name: record_from_state(meta, _record_tensors(t, name)) for name, meta in metas.items()}

    def inputs(self, i: int, device):
        """Block i's calibration inputs, one batch at a time (what block i - 1 left)."""
        from safetensors.torch import load_file

        n = json.loads((self.folder / f"block-{i - 1}.json").read_text())["batches"]
        for j in range(n):
            yield load_file(str(self.folder / f"inputs-{i}-{j}.safetensors"))["x"].to(device)

    def finish(self) -> None:
        """The run ended well: the folder goes."""
        if self.folder.exists():
            for f in self.folder.iterdir():
                f.unlink()
            self.folder.rmdir()


def _record_tensors(t: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    p = f"records.{name}."
    return {k[len(p) :]: v for k, v in t.items() if k.startswith(p)}


def _grid_codes(w: torch.Tensor | None, rec: ModuleRecord) -> dict[str, torch.Tensor] | None:
    """The packed integer codes of ``w`` when it lies on the record's integer grid exactly
    (its codes, dequantized, give ``w`` back bit for bit; where ``w`` holds -0.0, a 1-bit
    mask keeps the sign); else None (the weight stays float)."""
    a, qp = rec.weight_args, rec.qparams
    if w is None or a is None or qp is None or a.kind != "int" or a.granularity == "token":
        return None
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] != rec.in_features:
        return None
    try:
        codes = quantize(w, qp, a).to(torch.int64)
        back = dequantize(codes.to(torch.float32), qp, a)
    except (RuntimeError, ValueError):  # qparams of another layout (a method's own storage form)
        return None
    if back.shape != w.shape:
        return None
    negzero = (w == 0) & torch.signbit(w)
    back[negzero] = -0.0
    if not torch.equal(back.view(torch.int32), w.view(torch.int32)):
        return None
    out = {"codes": pack_codes(codes, a.bits, offset=-a.qmin)}
    if negzero.any():
        out["negzero"] = pack_codes(negzero.to(torch.int64), 1)
    return out


def _from_codes(parts: dict[str, torch.Tensor], rec: ModuleRecord) -> torch.Tensor:
    a = rec.weight_args
    codes = unpack_codes(parts["codes"], a.bits, rec.in_features, offset=-a.qmin)
    w = dequantize(codes.to(torch.float32), rec.qparams, a)
    if "negzero" in parts:
        w[unpack_codes(parts["negzero"], 1, rec.in_features).bool()] = -0.0
    return w


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory: clone the repeats."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = (v.data_ptr(), v.numel())
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_file(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))
