"""Storage form ``lowrank``: a factored linear, W = A @ B.

Tensors: ``A`` [out, rank] and ``B`` [rank, in] at the weight's dtype; the spec's ``meta``
holds ``rank``, and ``shared: {"B": NAME}`` when B is another layer's (QSVD: k_proj and v_proj
use q_proj's B, stored once with q_proj; the loader hands it to them). Quantized factors (the
method's ``weights``): each factor is stored as an integer grid (:mod:`.int_grid`) under
``A.`` / ``B.`` (``A.qweight``, ``A.scale``, ...), its grid's entry under ``meta.factors``.
The method hands the factors over in ``payload`` (with their scales); the form stores them
only while the model's weight is still exactly their product (a later change makes the
writer store the layer dense and say so).

Runtime: :class:`~llmpress.runtime.lowrank.LowRankLinear` (two matmuls; quantized factors
served by their grid's kernel, e.g. llmpress's int4 kernel, float factors as float). Size: each factor's numbers at ``dense_bits`` (float) or at its grid's bits with
scales (quantized), over out * in; a shared B counts with the layer that stores it.
compressed-tensors has no low-rank form: the export writes the dense product (same outputs,
no saving) and says so.
"""

from __future__ import annotations

import logging

import torch

from ...quant.core import QParams
from ...runtime.act_quant import ActQuantLinear
from ...runtime.lowrank import LowRankLinear
from ...runtime.qlinear import DequantLinear
from ..form import LayerState, LinearSpec, StorageForm, get_form, register_form

log = logging.getLogger(__name__)
FACTORS = ("A", "B")


def _shape(f: str, out_f: int, in_f: int, r: int) -> tuple[int, int]:
    return (out_f, r) if f == "A" else (r, in_f)


def _own(f: str, shared: dict) -> bool:
    return f not in shared


@register_form("lowrank")
class LowRank(StorageForm):
    def encode(self, state):
        A, B = state.payload.get("A"), state.payload.get("B")
        if A is None or B is None or state.weight is None:
            return None
        if not torch.equal((A.to(state.weight.dtype) @ B.to(state.weight.dtype)), state.weight):
            return None  # the weight changed after factoring: stored dense
        meta: dict = {"rank": int(A.shape[1]), **({"shared": dict(state.shared)} if state.shared else {})}
        tensors: dict[str, torch.Tensor] = {}
        for f, t in (("A", A), ("B", B)):
            if not _own(f, state.shared):
                continue
            if state.weight_args is None:
                tensors[f] = t.contiguous()
                continue
            zp = state.payload.get(f"{f}.zero_point")
            fs = LayerState(name=f"{state.name}.{f}", out_features=t.shape[0], in_features=t.shape[1], weight=t, weight_args=state.weight_args,
                            qparams=QParams(scale=state.payload[f"{f}.scale"], zero_point=zp))  # fmt: skip
            enc = get_form("quant").encode(fs)
            if enc is None:
                return None
            spec_f, t_f = enc
            meta.setdefault("factors", {})[f] = spec_f.to_dict()
            tensors.update({f"{f}.{k}": v for k, v in t_f.items()})
        if state.weight_args is not None and "factors" not in meta:
            meta["factors"] = {}
        return self.spec(state, weight_args=state.weight_args, meta=meta), tensors

    def _factor(self, spec, f: str, tensors, dtype):
        if spec.weight_args is None:
            return tensors[f].to(dtype)
        codes = tensors[f"{f}.qweight"]
        cached = getattr(codes, "_llmpress_decoded", None)  # a shared factor is decoded once, for every layer using it
        if cached is not None and cached.dtype == dtype:
            return cached
        out = get_form("quant").decode(*self._grid(spec, f, tensors), dtype)
        codes._llmpress_decoded = out
        return out

    def _grid(self, spec, f: str, tensors) -> tuple[LinearSpec, dict]:
        """Quantized factor ``f``: its grid's spec and its tensors (names without ``f.``)."""
        fs = LinearSpec.from_dict(spec.meta["factors"][f], f"factor {f}") if f in spec.meta.get("factors", {}) else self._shared_spec(spec, f)
        return fs, {k[len(f) + 1 :]: v for k, v in tensors.items() if k.startswith(f + ".")}

    def _shared_spec(self, spec, f: str) -> LinearSpec:
        """The grid of a factor another layer stores (same arguments, its shape)."""
        r = spec.meta["rank"]
        out_f, in_f = _shape(f, spec.out_features, spec.in_features, r)
        return LinearSpec(kind="quant", out_features=out_f, in_features=in_f, weight_args=spec.weight_args)

    def decode(self, spec, tensors, dtype=None):
        dtype = dtype or torch.float32
        return self._factor(spec, "A", tensors, dtype) @ self._factor(spec, "B", tensors, dtype)

    def payload(self, spec, tensors):
        if not tensors:
            return {}
        return {f: self._factor(spec, f, tensors, torch.float32) for f in FACTORS if f in tensors or any(k.startswith(f + ".") for k in tensors)}

    def check_spec(self, spec):
        r = spec.meta.get("rank")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"a lowrank layer needs meta.rank >= 1, found {r!r}")
        shared = spec.meta.get("shared", {})
        if not isinstance(shared, dict) or set(shared) - {"B"} or not all(isinstance(v, str) for v in shared.values()):
            raise ValueError(f"a lowrank layer's meta.shared maps B to the layer storing it, found {shared!r}")
        if spec.weight_args is not None:
            own = [f for f in FACTORS if _own(f, shared)]
            if set(spec.meta.get("factors", {})) != set(own):
                raise ValueError(f"a lowrank layer with quantized factors needs meta.factors for {own}")
            for f in own:
                LinearSpec.from_dict(spec.meta["factors"][f], f"factor {f}")

    def expected_shapes(self, spec):
        r = spec.meta["rank"]
        shared = spec.meta.get("shared", {})
        out = {}
        for f in FACTORS:
            if not _own(f, shared):
                continue
            if spec.weight_args is None:
                out[f] = _shape(f, spec.out_features, spec.in_features, r)
            else:
                fs = LinearSpec.from_dict(spec.meta["factors"][f], f"factor {f}")
                out.update({f"{f}.{k}": v for k, v in fs.expected_shapes().items()})
        return out

    def bits_per_weight(self, state, dense_bits=16):
        A = state.payload.get("A")
        r = A.shape[1] if A is not None else 0
        bits = 0.0
        for f in FACTORS:
            if not _own(f, state.shared):
                continue  # a shared B counts with its owner
            out_f, in_f = _shape(f, state.out_features, state.in_features, r)
            if state.weight_args is None:
                bits += dense_bits * out_f * in_f
            else:
                fs = LayerState(name=f, out_features=out_f, in_features=in_f, weight_args=state.weight_args)
                bits += get_form("quant").bits_per_weight(fs, dense_bits) * out_f * in_f
        return (bits + state.extra_bits) / state.n_params

    def _factor_module(self, spec, f: str, tensors, backend, device, act_dtype):
        """Factor ``f`` as a linear module: quantized factors through their grid's kernel (a
        shared factor is built once: the layers using it hold the same module)."""
        key = tensors[f] if spec.weight_args is None else tensors[f"{f}.qweight"]
        built = getattr(key, "_llmpress_modules", None)
        if built is None:
            built = key._llmpress_modules = {}
        how = (backend, str(device), act_dtype)
        if how in built:
            return built[how]
        if spec.weight_args is None:
            mod = DequantLinear(self._factor(spec, f, tensors, torch.float32).to(device))
        else:
            mod = get_form("quant").build(*self._grid(spec, f, tensors), backend=backend, device=device, act_dtype=act_dtype)
        built[how] = mod
        return mod

    def build(self, spec, tensors, *, bias=None, backend="auto", device="cpu", act_dtype=None):
        A, B = (self._factor_module(spec, f, tensors, backend, device, act_dtype) for f in FACTORS)
        mod = LowRankLinear(A, B, bias)
        return ActQuantLinear(mod, spec.act_args) if spec.act_args else mod

    def ct_scheme(self, name, spec):
        log.warning("layer %s: compressed-tensors has no low-rank form; exported as its dense product (rank %d)", name, spec.meta["rank"])
        return None
