"""Storage form ``lowrank``: a factored linear, W = A @ B.

Tensors: ``A`` [out, rank] and ``B`` [rank, in] at the weight's dtype; the spec's ``meta``
holds ``rank``, and ``shared: {"B": NAME}`` when B is another layer's (QSVD: k_proj and v_proj
use q_proj's B, stored once with q_proj; the loader hands it to them). The method hands the factors over in ``payload``; the form stores them only
while the model's weight is still exactly their product (a later stage that changed the
weight, e.g. quantized it, makes the writer store the layer dense and say so).

Runtime: :class:`~llmpress.runtime.lowrank.LowRankLinear` (two matmuls). Size: the factors'
r(out + in) numbers at ``dense_bits`` each, i.e. ``dense_bits * r (out + in) / (out * in)``
bits per weight of the dense layer. compressed-tensors has no low-rank form: the export
writes the dense product (same outputs, no saving) and says so.
"""

from __future__ import annotations

import logging

import torch

from ...runtime.act_quant import ActQuantLinear
from ...runtime.lowrank import LowRankLinear
from ..form import StorageForm, register_form

log = logging.getLogger(__name__)


@register_form("lowrank")
class LowRank(StorageForm):
    def encode(self, state):
        A, B = state.payload.get("A"), state.payload.get("B")
        if A is None or B is None or state.weight is None:
            return None
        if not torch.equal((A.to(state.weight.dtype) @ B.to(state.weight.dtype)), state.weight):
            return None  # the weight changed after factoring: stored dense
        meta = {"rank": int(A.shape[1]), **({"shared": dict(state.shared)} if state.shared else {})}
        tensors = {k: v.contiguous() for k, v in (("A", A), ("B", B)) if k not in state.shared}
        return self.spec(state, meta=meta), tensors

    def decode(self, spec, tensors, dtype=None):
        dtype = dtype or tensors["A"].dtype
        return tensors["A"].to(dtype) @ tensors["B"].to(dtype)

    def payload(self, spec, tensors):
        return {k: tensors[k] for k in ("A", "B") if k in tensors} if tensors else {}

    def check_spec(self, spec):
        r = spec.meta.get("rank")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"a lowrank layer needs meta.rank >= 1, found {r!r}")
        shared = spec.meta.get("shared", {})
        if not isinstance(shared, dict) or set(shared) - {"B"} or not all(isinstance(v, str) for v in shared.values()):
            raise ValueError(f"a lowrank layer's meta.shared maps B to the layer storing it, found {shared!r}")

    def expected_shapes(self, spec):
        r = spec.meta["rank"]
        own = {"A": (spec.out_features, r), "B": (r, spec.in_features)}
        return {k: v for k, v in own.items() if k not in spec.meta.get("shared", {})}

    def bits_per_weight(self, state, dense_bits=16):
        r = state.payload["A"].shape[1] if "A" in state.payload else 0
        numbers = r * state.out_features + (0 if "B" in state.shared else r * state.in_features)  # a shared B counts with its owner
        return (dense_bits * numbers + state.extra_bits) / state.n_params

    def build(self, spec, tensors, *, bias=None, backend="auto", device="cpu", act_dtype=None):
        mod = LowRankLinear(tensors["A"].to(device), tensors["B"].to(device), bias)
        return ActQuantLinear(mod, spec.act_args) if spec.act_args else mod

    def ct_scheme(self, name, spec):
        log.warning("layer %s: compressed-tensors has no low-rank form; exported as its dense product (rank %d)", name, spec.meta["rank"])
        return None
