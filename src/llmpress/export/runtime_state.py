"""What a saved model needs beyond its tensors and its linears' schemes.

Some methods leave a model whose outputs depend on more than the tensors a fresh model of
its architecture holds:

- run-time modules (:mod:`llmpress.runtime.rotation_state`): online rotations (Hadamard,
  DuQuant blocks and permutations, dense / learned SpinQuant matrices) on q/k, the o_proj
  and down_proj inputs and norm outputs, and KV-cache quantizers;
- LLM.int8() linears (:mod:`llmpress.runtime.llm_int8`): a threshold and a GEMM backend;
- structure edits (OS+ shifts of ``smoothquant shift: true``): a :class:`NormShift`
  wrapped around a norm (its weight moves to ``NORM.norm.weight``, plus ``NORM.shift``)
  and biases created on linears that had none; decoder blocks of their own sizes
  (``prune_width allocation: global``): ``block_sizes``, each block's intermediate size
  and head counts, the config holding the largest (:mod:`llmpress.prune.structure`).

:func:`collect` describes them (JSON) and returns the tensors of the run-time modules;
:func:`prepare` (before the tensors are loaded) and :func:`attach` (after) rebuild them
on a fresh model. A tensor no known method explains is refused: nothing could rebuild it.

The Hugging Face ``hf-fakequant`` folder carries only what plain transformers can run
without (per-module quantizers: activations, KV cache, LLM.int8); online rotations and
OS+ shifts change the function itself, per-block sizes are more than one config.json
describes, and :func:`check_save_format` refuses them from the recipe alone, before any
model is loaded.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..arch import get_arch, get_module, set_module
from ..errors import UnsupportedArchitecture, UserError
from ..prune.structure import block_sizes, resize_blocks
from ..runtime import rotation_state
from ..runtime.act_quant import plain, plain_state_dict
from ..runtime.kv_quant import AttentionRuntime
from ..runtime.llm_int8 import LLMInt8Linear, install_llm_int8
from ..runtime.online_hadamard import OnlineRotation
from ..transform.scaling import NormShift, ensure_bias
from .skeleton import skeleton

RUNTIME_PREFIX = "llmpress.runtime."  # reserved prefix of run-time tensors in the weights file
ROTATION_METHODS = ("quarot", "duquant", "spinquant")  # methods that attach online rotations
FAKEQUANT_FORMAT = "llmpress-fakequant-v1"
PER_BLOCK = "decoder blocks of different sizes"
PER_BLOCK_FIX = "one Hugging Face config.json gives every block the same intermediate_size and head counts: save in the default packed format"


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def collect(model: nn.Module, state: dict[str, torch.Tensor], reference: set[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(description, tensors) of what ``model`` holds beyond a fresh model of its config.

    ``state``: the model's state dict under plain names (:func:`llmpress.runtime.act_quant.plain_state_dict`);
    ``reference``: the state-dict keys of a fresh model. Description keys (each only when
    present): ``runtime``, ``llm_int8``, ``structure``; tensor names start with
    :data:`RUNTIME_PREFIX`.
    """
    kinds = {"llmpress_attn": AttentionRuntime, "llmpress_down_in": OnlineRotation, "llmpress_out_rot": OnlineRotation}
    odd = [
        f"{n}.{a}" for n, m in model.named_modules() for a, k in kinds.items() if getattr(m, a, None) is not None and not isinstance(getattr(m, a), k)
    ]
    if odd:
        raise UserError(f"the model carries run-time modules llmpress cannot save ({_some(odd)}); a checkpoint could not rebuild them")
    desc: dict = {}
    tensors: dict[str, torch.Tensor] = {}
    rt, rt_t = rotation_state.export_runtime(model)
    if not rotation_state.is_empty(rt):
        desc["runtime"] = rt
        # float32: the forward casts rotations to the activation dtype, so float32 inference
        # is bit-identical to float64 storage, at half the bytes
        tensors = {RUNTIME_PREFIX + k: v.float() if v.is_floating_point() else v.clone() for k, v in rt_t.items()}
    int8 = {n: {"threshold": m.threshold, "backend": m.backend} for n, m in model.named_modules() if isinstance(m, LLMInt8Linear)}
    if int8:
        desc["llm_int8"] = int8
    shifts = [n for n, m in model.named_modules() if isinstance(m, NormShift)]
    biases, unknown = [], []
    for k in sorted(set(state) - reference):
        owner, _, leaf = k.rpartition(".")
        if any(k.startswith(f"{p}.") for p in shifts):
            continue
        if leaf == "bias" and isinstance(plain(get_module(model, owner)), nn.Linear):
            biases.append(owner)
        else:
            unknown.append(k)
    if unknown:
        raise UserError(
            f"the model holds tensors its architecture does not and no llmpress method explains ({_some(unknown, 4)}); "
            "a checkpoint could not rebuild them"
        )
    gone = sorted(k for k in reference - set(state) if not any(k.startswith(f"{p}.") for p in shifts))
    if gone:
        raise UserError(f"the model lacks tensors its architecture has ({_some(gone, 4)}); a checkpoint of it could not be loaded")
    sizes = _block_sizes(model)
    if shifts or biases or sizes:
        desc["structure"] = {"norm_shifts": shifts, "biases": biases, **({"block_sizes": sizes} if sizes else {})}
    return desc, tensors


def _block_sizes(model: nn.Module) -> list[dict] | None:
    """Each decoder block's sizes when they differ from the config's (None: the config describes them)."""
    try:
        spec = get_arch(model)
    except UnsupportedArchitecture:
        return None
    return block_sizes(model, spec)


def summary(desc: dict) -> list[str]:
    """What a description holds, in words (for messages)."""
    out = rotation_state.summary(desc["runtime"]) if desc.get("runtime") else []
    if desc.get("llm_int8"):
        out.append(f"LLM.int8() decomposition ({len(desc['llm_int8'])} linears)")
    st = desc.get("structure") or {}
    if st.get("norm_shifts"):
        out.append(f"OS+ norm shifts ({len(st['norm_shifts'])} norms)")
    if st.get("biases"):
        out.append(f"biases added to {len(st['biases'])} linears")
    if st.get("block_sizes"):
        out.append(f"per-block sizes ({len(st['block_sizes'])} blocks)")
    return out


def _where(what: str, path: str, e: Exception) -> UserError:
    return UserError(f"{what}: cannot rebuild the run-time state at {path!r} ({type(e).__name__}: {e})")


def prepare(model: nn.Module, desc: dict, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Structure edits of ``desc`` on a fresh model, before its tensors are loaded: blocks
    cut to their own sizes, biases created (zeros), norms wrapped in :class:`NormShift`
    (shift from ``tensors``)."""
    st = desc.get("structure") or {}
    if st.get("block_sizes") is not None:
        resize_blocks(model, get_arch(model), st["block_sizes"], what)
    for path in st.get("biases", []):
        try:
            lin = get_module(model, path)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{type(lin).__name__} is not a Linear")
            ensure_bias(lin)
        except (AttributeError, TypeError, UserError) as e:
            raise _where(what, path, e) from None
    for path in st.get("norm_shifts", []):
        shift = tensors.get(f"{path}.shift")
        if shift is None:
            raise UserError(f"{what}: norm shift {path}.shift is not stored")
        try:
            set_module(model, path, NormShift(get_module(model, path), shift))
        except (AttributeError, UserError) as e:
            raise _where(what, path, e) from None


def runtime_tensors(tensors: dict[str, torch.Tensor], desc: dict, what: str) -> dict[str, torch.Tensor]:
    """Remove and return the run-time tensors of ``tensors`` (prefix stripped), checked
    against what the description needs."""
    got = {k[len(RUNTIME_PREFIX) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(RUNTIME_PREFIX)]}
    rt = desc.get("runtime")
    if rt is not None and rt.get("format") != rotation_state.FORMAT:
        raise UserError(
            f"{what}: run-time section {rt.get('format')!r} unknown (this llmpress reads {rotation_state.FORMAT}); written by a newer llmpress?"
        )
    try:
        need = rotation_state.tensor_names(rt) if rt is not None else set()
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{what}: malformed run-time section ({type(e).__name__}: {e})") from None
    if set(got) != need:
        raise UserError(f"{what}: run-time tensors stored {sorted(got)[:3]}, its description needs {sorted(need)[:3]}")
    return got


def attach(model: nn.Module, desc: dict, tensors: dict[str, torch.Tensor], what: str, int8_qparams: dict | None = None) -> None:
    """Re-attach the run-time modules of ``desc`` to a model holding the saved tensors.

    ``int8_qparams``: per LLM.int8() linear stored on its int8 grid, its qparams (the
    codes are then exactly the saved ones); others keep their float weight for the
    outlier columns and get codes from it."""
    rt = desc.get("runtime")
    if rt is not None:
        try:
            rotation_state.import_runtime(model, rt, tensors)
        except (KeyError, TypeError, ValueError, AttributeError, UserError) as e:
            raise UserError(f"{what}: cannot rebuild the online rotations / KV-cache quantizers ({type(e).__name__}: {e})") from None
    for path, a in (desc.get("llm_int8") or {}).items():
        try:
            lin = get_module(model, path)
            qp = (int8_qparams or {}).get(path)
            install_llm_int8(lin, float(a["threshold"]), "int8" if qp is not None else "float", a["backend"], qparams=qp)
        except (AttributeError, KeyError, TypeError, ValueError, UserError) as e:
            raise _where(what, path, e) from None


# ---- the hf-fakequant folder ------------------------------------------------------------


def _refused_in_hf(desc: dict) -> list[str]:
    rt = desc.get("runtime")
    rot = rt is not None and (rt["rotations"] or rt["mlp_in"] or rt["out_rot"] or any(a["qk"] or a["o"] for a in rt["attention"].values()))
    return (["online rotations"] if rot else []) + [s for s in summary({"structure": desc.get("structure")})]


def fakequant_meta(model: nn.Module) -> dict:
    """llmpress.json keys of an hf-fakequant folder beyond ``activation_quant``: the
    KV-cache quantizers and LLM.int8() linears, which the folder's plain weights run
    without. Refuses models plain transformers would run as another function."""
    state = plain_state_dict(model)
    desc, _ = collect(model, state, set(skeleton(model.config, meta=True).state_dict()))
    if (desc.get("structure") or {}).get("block_sizes"):
        raise UserError(f"--format hf-fakequant cannot store {PER_BLOCK}; {PER_BLOCK_FIX}")
    bad = _refused_in_hf(desc)
    if bad:
        raise UserError(
            f"--format hf-fakequant cannot store {', '.join(bad)}: a Hugging Face folder runs without them as another model; save in the default packed format"
        )
    return {k: desc[k] for k in ("runtime", "llm_int8") if k in desc}


def attach_fakequant(model: nn.Module, meta: dict, where: str) -> None:
    """Re-attach what :func:`fakequant_meta` stored to a model loaded from the folder."""
    m = re.fullmatch(r"llmpress-fakequant-v(\d+)", str(meta.get("format", "")))
    if m and int(m.group(1)) > 1:
        raise UserError(
            f"{where}: written by a newer llmpress (format {meta['format']}; this llmpress reads up to {FAKEQUANT_FORMAT}): upgrade llmpress"
        )
    attach(model, meta, {}, where)


def check_save_format(recipe, save_format: str) -> None:
    """Refuse, from the recipe alone (before any model is loaded), a save format that
    cannot hold what the recipe makes. The packed format holds every method's result;
    hf-fakequant cannot hold online rotations, OS+ shifts nor per-block sizes."""
    if save_format != "hf-fakequant":
        return
    for i, st in enumerate(recipe.stages):
        what = None
        if st.method == "prune_width" and getattr(st.config, "allocation", "uniform") != "uniform":
            raise UserError(f"--format hf-fakequant cannot store {PER_BLOCK} (recipe stage {i}: prune_width allocation global); {PER_BLOCK_FIX}")
        if st.method in ROTATION_METHODS:
            what = f"the online rotations of {st.method}"
        elif st.method == "smoothquant" and getattr(st.config, "shift", False):
            what = "OS+ shifts (smoothquant shift: true)"
        if what:
            raise UserError(
                f"--format hf-fakequant cannot store {what} (recipe stage {i}): a Hugging Face folder runs without them "
                "as another model; save in the default packed format"
            )
