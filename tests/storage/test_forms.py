"""The storage-form interface: forms are found by name, and a new form is one class (here
defined in this test file) that the packed writer, the loader, the size accounting and the
compressed-tensors export all use without any other change."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_llama

from llmpress.errors import UserError
from llmpress.eval.size import model_size
from llmpress.export.compressed_tensors import export_compressed_tensors
from llmpress.export.packed import checkpoint_accounting, packed_model_size, write_packed
from llmpress.export.packed_load import load_packed
from llmpress.registry import ModuleRecord
from llmpress.storage.form import FORMS, LayerState, LinearSpec, StorageForm, encode_layer, form_index, form_names, get_form, register_form
from llmpress.storage.grid import pack_unsigned, unpack_mask, unpack_unsigned, words


class SignLinear(nn.Module):
    """Runtime module of the toy form: signs as int8, one scale per row."""

    def __init__(self, signs: torch.Tensor, alpha: torch.Tensor, bias=None):
        super().__init__()
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("alpha", alpha, persistent=False)
        self.bias = bias

    def forward(self, x):
        return F.linear(x, (self.signs.float() * self.alpha[:, None]).to(x.dtype), self.bias)


@register_form("toy_sign")
class ToySign(StorageForm):
    """Scaled signs: w = alpha_row * sign, 1 bit per weight + a float32 scale per row."""

    def encode(self, state):
        w = state.weight.float()
        alpha = w.abs().amax(1)
        signs = torch.where(w >= 0, 1, -1)
        if not torch.equal(alpha[:, None] * signs, w):
            return None  # not a scaled sign matrix: stored dense
        return self.spec(state, meta={"alpha": "row"}), {"signs": pack_unsigned((signs > 0).to(torch.uint8), 1), "alpha": alpha.contiguous()}

    def _signs(self, spec, t):
        return unpack_unsigned(t["signs"], 1, spec.in_features).to(torch.int8) * 2 - 1

    def decode(self, spec, tensors, dtype=torch.float32):
        return (self._signs(spec, tensors).float() * tensors["alpha"][:, None]).to(dtype)

    def expected_shapes(self, spec):
        return {"signs": (spec.out_features, words(spec.in_features, 1)), "alpha": (spec.out_features,)}

    def bits_per_weight(self, state, dense_bits=16):
        return 1 + 32 / state.in_features

    def stored_bits(self, spec, nbytes, scale_bits):
        return spec.out_features * (spec.in_features + 32)

    def build(self, spec, tensors, *, bias=None, backend="auto", device="cpu", act_dtype=None):
        return SignLinear(self._signs(spec, tensors), tensors["alpha"].float(), bias)


NAME = "model.layers.0.mlp.up_proj"


def _toy_model():
    m = tiny_llama(seed=3, layers=1)
    lin = m.get_submodule(NAME)
    with torch.no_grad():
        w = lin.weight
        w.copy_(w.abs().amax(1, keepdim=True) * torch.where(w >= 0, 1.0, -1.0))
    rec = ModuleRecord(name=NAME, out_features=lin.out_features, in_features=lin.in_features, methods=["toy"], form="toy_sign")
    return m, {NAME: rec}


def test_builtin_forms_are_found_from_the_sources():
    index = form_index()
    assert {k: index[k] for k in ("quant", "sparse", "dense")} == {
        "quant": "llmpress.storage.forms.int_grid",
        "sparse": "llmpress.storage.forms.sparse_mask",
        "dense": "llmpress.storage.forms.dense",
    }
    assert form_names()[:3] == ["quant", "sparse", "dense"] and "toy_sign" in form_names()
    assert type(get_form("quant")).__name__ == "IntGrid"
    with pytest.raises(UserError, match="storage form 'nope' unknown; this llmpress knows quant, sparse, dense"):
        get_form("nope")


def test_toy_form_round_trip_encode_decode_bytes():
    m, recs = _toy_model()
    w = m.get_submodule(NAME).weight.detach()
    spec, t = encode_layer(w, recs[NAME])
    assert spec.kind == "toy_sign" and spec.meta == {"alpha": "row"}
    assert {k: tuple(v.shape) for k, v in t.items()} == spec.expected_shapes() == {"signs": (128, 2), "alpha": (128,)}
    assert torch.equal(get_form("toy_sign").decode(spec, t), w)  # bit for bit
    d = spec.to_dict()
    assert d["meta"] == {"alpha": "row"} and "version" not in d
    assert LinearSpec.from_dict(json.loads(json.dumps(d)), "x") == spec
    assert recs[NAME].bits_per_weight() == 1 + 32 / 64
    # a weight the form cannot hold exactly: None (the writer stores it dense)
    assert encode_layer(w + 0.01 * torch.arange(64.0), recs[NAME]) is None


def test_toy_form_through_packed_checkpoint_size_and_export(tmp_path):
    m, recs = _toy_model()
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        want = m(ids).logits
    folder = tmp_path / "packed"
    folder.mkdir()
    manifest = write_packed(m, None, folder, recs)
    assert manifest["layers"][NAME]["kind"] == "toy_sign" and manifest["dense_layers"] == []
    assert sorted(k for k in manifest["tensors"] if k.startswith(NAME)) == [f"{NAME}.alpha", f"{NAME}.signs"]
    loaded, _ = load_packed(folder)
    assert isinstance(loaded.get_submodule(NAME), SignLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    size = model_size(m, recs)
    assert size["quantized_linears"] == 1
    assert {k: v for k, v in packed_model_size(loaded).items() if k != "checkpoint_bytes"} == size  # the loaded record keeps its form
    n_lin = sum(p.numel() for n, p in m.named_parameters() if n.endswith("proj.weight") or n == "lm_head.weight")
    assert size["bits_per_weight"] == pytest.approx((16 * n_lin - (16 - 1.5) * 128 * 64) / n_lin)
    acc = checkpoint_accounting(manifest)
    assert acc["compressed_linear_bytes"] == 128 * 2 * 4 + 128 * 4
    assert acc["theoretical_bytes"] - acc["other_bytes"] == 128 * (64 + 32) / 8
    with pytest.raises(UserError, match=f"layer {NAME}: storage form 'toy_sign' has no compressed-tensors form"):
        export_compressed_tensors(folder, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_newer_form_version_and_unknown_kind_are_refused():
    d = {"kind": "quant", "shape": [4, 32], "weights": {"bits": 4, "granularity": "channel"}, "version": 2}
    with pytest.raises(UserError, match="storage form 'quant' v2 is newer than this llmpress reads .v1.; upgrade llmpress"):
        LinearSpec.from_dict(d, "layers.l")
    with pytest.raises(UserError, match=r"kind 'no-such-form' unknown \(this llmpress reads quant, sparse, dense"):
        LinearSpec.from_dict({**d, "kind": "no-such-form", "version": 1}, "layers.l")
    with pytest.raises(UserError, match="a quantized layer needs 'weights'"):
        LinearSpec.from_dict({"kind": "quant", "shape": [4, 32]}, "layers.l")


def test_layer_state_reads_the_record_once():
    rec = ModuleRecord(name="l", out_features=2, in_features=4, notes={"g_idx": [0, 0, 1, 1], "extra_bits": 8})
    s = LayerState.of(rec)
    assert s.g_idx.dtype == torch.int32 and s.g_idx.tolist() == [0, 0, 1, 1] and s.extra_bits == 8.0 and s.form is None
    assert rec.bits_per_weight() == 16 + 8 / 8  # no form: dense bits plus what the method accounted


def test_registering_a_name_twice_fails():
    with pytest.raises(RuntimeError, match="registered twice"):
        register_form("quant")(type("Other", (StorageForm,), {}))
    assert type(FORMS["quant"]).__name__ == "IntGrid"


class FactorLinear(torch.nn.Module):
    """Runtime module of the toy factored form: two matmuls, x B^T A^T."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias=None):
        super().__init__()
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.bias = bias

    def forward(self, x):
        return F.linear(F.linear(x, self.b.to(x.dtype)), self.a.to(x.dtype), self.bias)


@register_form("toy_factors")
class ToyFactors(StorageForm):
    """W = A B from the factors the method handed over (``payload``), never recomputed from W."""

    def encode(self, state):
        a, b = state.payload.get("a"), state.payload.get("b")
        if a is None or b is None or not torch.equal(a @ b, state.weight):
            return None
        return self.spec(state, meta={"rank": a.shape[1]}), {"a": a.contiguous(), "b": b.contiguous()}

    def decode(self, spec, tensors, dtype=torch.float32):
        return (tensors["a"] @ tensors["b"]).to(dtype)

    def expected_shapes(self, spec):
        r = spec.meta["rank"]
        return {"a": (spec.out_features, r), "b": (r, spec.in_features)}

    def bits_per_weight(self, state, dense_bits=16):
        r = state.payload["a"].shape[1]
        return dense_bits * r * (state.out_features + state.in_features) / state.n_params

    def stored_bits(self, spec, nbytes, scale_bits):
        return 8 * nbytes

    def build(self, spec, tensors, *, bias=None, backend="auto", device="cpu", act_dtype=None):
        return FactorLinear(tensors["a"].float(), tensors["b"].float(), bias)


def test_a_method_hands_tensors_to_its_form_through_the_payload(tmp_path):
    """The low-rank gap of docs/DEVELOPING.md: the factors reach the form as the method made them."""
    m = tiny_llama(seed=4, layers=1)
    lin = m.get_submodule(NAME)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 4, generator=g), torch.randn(4, 64, generator=g)
    with torch.no_grad():
        lin.weight.copy_(a @ b)
    rec = ModuleRecord(name=NAME, out_features=128, in_features=64, methods=["toy"], form="toy_factors", payload={"a": a, "b": b})
    assert LayerState.of(rec).payload.keys() == {"a", "b"} and not rec.notes
    assert rec.bits_per_weight() == pytest.approx(16 * 4 * (128 + 64) / (128 * 64))
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        want = m(ids).logits
    folder = tmp_path / "packed"
    folder.mkdir()
    manifest = write_packed(m, None, folder, {NAME: rec})
    assert manifest["layers"][NAME]["kind"] == "toy_factors" and manifest["layers"][NAME]["meta"] == {"rank": 4}
    loaded, _ = load_packed(folder)
    assert isinstance(loaded.get_submodule(NAME), FactorLinear)
    assert torch.equal(loaded.get_submodule(NAME).a, a)  # the method's factors, bit for bit
    with torch.no_grad():
        assert (loaded(ids).logits - want).abs().max() <= 1e-5 * want.abs().max()


def test_16_bit_codebook_indices_pack_and_unpack_without_overflow():
    idx = torch.tensor([[0, 65535, 40000, 1, 32768, 12345, 7, 65534]])
    back = unpack_unsigned(pack_unsigned(idx, 16), 16, 8)
    assert back.dtype == torch.int32 and torch.equal(back.long(), idx)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_mask_unpacking_by_table_equals_the_general_unpacking(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(3, 5, n, generator=g) > 0.4
    packed = pack_unsigned(mask.to(torch.uint8), 1)
    got = unpack_mask(packed, n)
    assert got.dtype == torch.bool and torch.equal(got, mask) and torch.equal(got, unpack_unsigned(packed, 1, n).bool())
    with pytest.raises(ValueError, match="fewer than"):
        unpack_mask(packed, 32 * packed.shape[-1] + 1)


def test_a_sparse_layer_decodes_its_values_in_row_major_order():
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 4.0]])
    spec, t = get_form("sparse").encode(LayerState.of(ModuleRecord(name="l", out_features=2, in_features=4, methods=["magnitude"], sparsity=0.5), w))
    assert torch.equal(t["values"], torch.tensor([1.5, -2.0, 3.0, 4.0]))
    assert torch.equal(get_form("sparse").decode(spec, t), w)
    with pytest.raises(UserError, match="mask keeps 4 weights but 3 values"):
        get_form("sparse").decode(spec, {**t, "values": t["values"][:3]})
