"""What the storage forms of GGUF's own grids share (``q2_k`` / ``q4_k`` / ``q5_k`` and
``iq4_nl`` / ``iq4_xs``): the method hands over the grid's tensors (``record.payload``), the
form keeps them only while they decode to the model's weight bit for bit, and a layer's size
is a fixed number of bits per weight."""

from __future__ import annotations

import torch

from ..form import LinearSpec, StorageForm


class OwnGridForm(StorageForm):
    """A subclass gives ``params_of`` (the stored tensors as the grid's parameters, whose
    ``dequantize()`` is the weight), ``total_bits`` (per weight) and ``pack`` (the payload as
    stored tensors, or None where its shapes or values do not fit)."""

    decodes_at_load = True
    ties_embedding = True

    def params_of(self, spec: LinearSpec, tensors: dict[str, torch.Tensor]):
        raise NotImplementedError

    def total_bits(self) -> float:
        raise NotImplementedError

    def pack(self, payload: dict, rows: int, cols: int) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def encode(self, state):
        w = state.weight
        if w is None or state.payload.get("codes") is None:
            return None
        w = w.detach().cpu()
        tensors = self.pack({k: v.cpu() for k, v in state.payload.items() if v is not None}, *w.shape)
        if tensors is None:
            return None
        spec = self.spec(state)
        if not torch.equal(self.decode(spec, tensors, w.dtype), w):  # stored only while exact
            return None
        return spec, tensors

    def decode(self, spec, tensors, dtype=torch.float32):
        return self.params_of(spec, tensors).dequantize().to(dtype)

    def bits_per_weight(self, state, dense_bits=16):
        if state.payload.get("codes") is None:  # no grid handed over: counted as the dense weight
            return float(dense_bits) + state.extra_bits / state.n_params
        return self.total_bits() + state.extra_bits / state.n_params

    def stored_bits(self, spec, nbytes, scale_bits):
        return spec.out_features * spec.in_features * self.total_bits()

    def payload(self, spec, tensors):
        if not tensors:
            return {}
        p = self.params_of(spec, tensors)
        return {k: v for k, v in vars(p).items() if isinstance(v, torch.Tensor)}


def fp16_valued(t: torch.Tensor) -> bool:
    return torch.equal(t.half().float(), t.float())
