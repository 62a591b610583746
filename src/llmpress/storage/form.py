"""The storage form of a compressed linear: one interface, forms found by name.

A *storage form* is how one compressed linear [out, in] lives outside the model: a few
named tensors plus a small JSON entry (:class:`LinearSpec`, the ``layers`` entry of a
packed checkpoint's llmpress.json). One :class:`StorageForm` subclass per form, in one
file of :mod:`llmpress.storage.forms`, registered with ``@register_form("name")`` at the
start of a line, holds everything about that form:

- ``encode(state) -> (spec, tensors) | None``: the tensors of one layer (None when the form
  cannot hold that weight exactly; the writer then stores it dense and says so);
- ``decode(spec, tensors, dtype) -> weight``: the dense weight back, bit for bit;
- ``expected_shapes(spec)``: the tensors a stored layer must have (checked on load);
- ``bits_per_weight(state, dense_bits)``: what ``eval/size.py`` and the report count;
  ``stored_bits(spec, nbytes, scale_bits)``: the checkpoint's theoretical size;
- ``build(spec, tensors, ...)``: the runtime module that serves the layer;
- ``ct_scheme`` / ``ct_tensors``: its compressed-tensors form, or a UserError naming the
  form (the default).

:func:`get_form` finds a form by name (``spec.kind``) without any list of forms: like the
method registry, it reads the sources of :data:`FORM_PACKAGES` for ``@register_form(...)``
lines and imports only the module that registers the name asked for (the forms sit on the
runtime floor, above this module, since each names its runtime module). :func:`encode_layer`
picks a layer's form (``record.form``, else an integer grid when the layer has weight
quantization arguments, else a sparse mask when it was pruned).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import UserError
from ..prune.masks import is_nm
from ..quant.args import QuantArgs
from ..quant.core import QParams

NM_PATTERNS = ((2, 4), (4, 8))
# the forms of llmpress-packed-v1, in the order its error messages list them
BUILTIN_ORDER = ("quant", "sparse", "dense")


@dataclass(kw_only=True)
class LinearSpec:
    """How one linear is stored (the JSON side of the checkpoint; tensors hold the data).

    ``kind`` names the storage form. ``meta`` (a form's own JSON fields) and ``version``
    (the form's version, written only when not 1) are absent from the forms of v1."""

    kind: str  # the storage form: "quant", "sparse", "dense" (weight kept as is, e.g. activation quantization only), ...
    out_features: int
    in_features: int
    weight_args: QuantArgs | None = None
    act_args: QuantArgs | None = None
    sparsity: float = 0.0
    structure: str | None = None  # "2:4", "4:8" or "unstructured" when sparse
    has_g_idx: bool = False
    n_exceptions: int = 0
    methods: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    def to_dict(self) -> dict:
        d = {
            "kind": self.kind,
            "shape": [self.out_features, self.in_features],
            "weights": self.weight_args.to_dict() if self.weight_args else None,
            "activations": self.act_args.to_dict() if self.act_args else None,
            "sparsity": self.sparsity,
            "structure": self.structure,
            "g_idx": self.has_g_idx,
            "exceptions": self.n_exceptions,
            "methods": list(self.methods),
        }
        if self.meta:
            d["meta"] = dict(self.meta)
        if self.version != 1:
            d["version"] = self.version
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> LinearSpec:
        try:
            kind = d["kind"]
            out_f, in_f = (int(v) for v in d["shape"])
            if kind not in form_names():
                raise ValueError(f"kind {kind!r} unknown (this llmpress reads {', '.join(form_names())})")
            form = get_form(kind)
            version = int(d.get("version", 1))
            if version > form.version:
                raise UserError(
                    f"checkpoint config {where}: storage form {kind!r} v{version} is newer than this llmpress reads (v{form.version}); upgrade llmpress"
                )
            spec = cls(
                kind=kind,
                out_features=out_f,
                in_features=in_f,
                weight_args=QuantArgs.from_dict(d["weights"], f"{where}.weights") if d.get("weights") else None,
                act_args=QuantArgs.from_dict(d["activations"], f"{where}.activations") if d.get("activations") else None,
                sparsity=float(d.get("sparsity", 0.0)),
                structure=d.get("structure"),
                has_g_idx=bool(d.get("g_idx", False)),
                n_exceptions=int(d.get("exceptions", 0)),
                methods=list(d.get("methods", [])),
                meta=dict(d.get("meta") or {}),
                version=version,
            )
            form.check_spec(spec)
            return spec
        except UserError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"checkpoint config {where}: malformed layer entry ({e})") from None

    @property
    def n_groups(self) -> int:
        a = self.weight_args
        if a.granularity in ("tensor", "channel"):
            return 1
        return self.in_features // a.group_size

    @property
    def scale_shape(self) -> tuple[int, int]:
        a = self.weight_args
        return (1, 1) if a.granularity == "tensor" else (self.out_features, self.n_groups)

    def expected_shapes(self) -> dict[str, tuple[int, ...] | None]:
        """Shape of every tensor this layer stores (None: any length, e.g. a sparse layer's values)."""
        return get_form(self.kind).expected_shapes(self)


@dataclass(kw_only=True)
class LayerState:
    """What compression left in one linear, as the storage forms read it: the model's
    weight (None when only sizes are asked) and the record of the methods that ran."""

    name: str
    out_features: int
    in_features: int
    weight: torch.Tensor | None = None
    weight_args: QuantArgs | None = None
    qparams: QParams | None = None
    act_args: QuantArgs | None = None
    sparsity: float = 0.0
    methods: list[str] = field(default_factory=list)
    g_idx: torch.Tensor | None = None  # int32 [in]: group of each input column (act-order groups)
    extra_bits: float = 0.0  # storage beside the form's own tensors that a method accounts for (e.g. CSR outliers)
    form: str | None = None  # the form a method asked for (None: chosen from weight_args / sparsity)
    payload: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors the method handed to its form (ModuleRecord.payload)
    shared: dict[str, str] = field(default_factory=dict)  # payload tensors another layer stores: key -> that layer's name (QSVD's B)

    @property
    def n_params(self) -> int:
        return self.out_features * self.in_features

    @classmethod
    def of(cls, record, weight: torch.Tensor | None = None) -> LayerState:
        """From a :class:`~llmpress.registry.ModuleRecord` (the one place that reads its ``notes``)."""
        g_idx = record.notes.get("g_idx")
        return cls(
            name=record.name,
            out_features=record.out_features,
            in_features=record.in_features,
            weight=weight,
            weight_args=record.weight_args,
            qparams=record.qparams,
            act_args=record.act_args,
            sparsity=record.sparsity,
            methods=list(record.methods),
            g_idx=None if g_idx is None else torch.as_tensor(g_idx, dtype=torch.int32).reshape(-1),
            extra_bits=float(record.notes.get("extra_bits", 0)),
            form=getattr(record, "form", None),
            payload=dict(getattr(record, "payload", None) or {}),
            shared=dict(record.notes.get("shared") or {}),
        )


class StorageForm:
    """One storage form. Subclass it in one file of :mod:`llmpress.storage.forms` and put
    ``@register_form("name")`` on the class at the start of a line."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    counts_as_compressed: ClassVar[bool] = True  # eval/size.py's "quantized_linears"
    decodes_at_load: ClassVar[bool] = False  # its runtime module holds a decoded copy, not the stored tensors
    ties_embedding: ClassVar[bool] = False  # a tied embedding may read its rows from this form's runtime module (its dequantized_weight)

    def encode(self, state: LayerState) -> tuple[LinearSpec, dict[str, torch.Tensor]] | None:
        raise NotImplementedError

    def decode(self, spec: LinearSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def expected_shapes(self, spec: LinearSpec) -> dict[str, tuple[int, ...] | None]:
        raise NotImplementedError

    def bits_per_weight(self, state: LayerState, dense_bits: int = 16) -> float:
        raise NotImplementedError

    def stored_bits(self, spec: LinearSpec, nbytes: dict[str, int], scale_bits: int) -> float:
        """Theoretical bits of the stored layer (``nbytes``: bytes of each of its tensors)."""
        return 8.0 * sum(nbytes.values())

    def build(
        self,
        spec: LinearSpec,
        tensors: dict[str, torch.Tensor],
        *,
        bias: torch.Tensor | None = None,
        backend: str = "auto",
        device: str | torch.device = "cpu",
        act_dtype: torch.dtype | None = None,
    ):
        """The runtime module serving the layer (activation quantization included)."""
        raise NotImplementedError

    def qparams(self, spec: LinearSpec, tensors: dict[str, torch.Tensor] | None) -> QParams | None:
        """Quantization parameters a loaded model's record keeps (None: none)."""
        return None

    def payload(self, spec: LinearSpec, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Tensors a loaded model's record keeps for this form's accounting (low-rank factors)."""
        return {}

    def check_spec(self, spec: LinearSpec) -> None:
        """Raise ValueError when a checkpoint's entry lacks what this form needs."""

    def ct_scheme(self, name: str, spec: LinearSpec) -> tuple[dict, str] | None:
        """(compressed-tensors scheme, format) of the layer, None to write it dense, or a
        UserError when compressed-tensors cannot hold it."""
        raise UserError(f"layer {name}: storage form {self.name!r} has no compressed-tensors form; export a checkpoint without it")

    def ct_tensors(self, name: str, spec: LinearSpec, tensors: dict[str, torch.Tensor], fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise UserError(f"layer {name}: storage form {self.name!r} has no compressed-tensors form")

    def spec(self, state: LayerState, **kw) -> LinearSpec:
        """A :class:`LinearSpec` of this form with the fields every form records."""
        pruned = state.sparsity > 0  # zeros a pruning method made (not a grid's natural zero codes)
        structure = structure_of(state.weight) if pruned and state.weight is not None else None
        return LinearSpec(
            kind=self.name,
            out_features=state.out_features,
            in_features=state.in_features,
            act_args=state.act_args,
            sparsity=state.sparsity,
            structure=structure,
            methods=list(state.methods),
            version=self.version,
            **kw,
        )


def structure_of(weight: torch.Tensor) -> str | None:
    """N:M pattern the zeros of ``weight`` follow, "unstructured", or None (dense)."""
    if not bool((weight == 0).any()):
        return None
    for n, m in NM_PATTERNS:
        if weight.shape[1] % m == 0 and is_nm(weight, n, m):
            return f"{n}:{m}"
    return "unstructured"


# ---- the registry -----------------------------------------------------------------------

FORMS: dict[str, StorageForm] = {}
# Packages whose modules are searched for ``@register_form`` lines; a plug-in (or a test) may append one.
FORM_PACKAGES: list[str] = [__name__.rpartition(".")[0] + ".forms"]
_REGISTRATION = re.compile(r"^@register_form\(\s*[\"']([^\"']+)[\"']", re.M)


def register_form(name: str):
    """Class decorator: ``@register_form("quant")`` on a :class:`StorageForm` subclass."""

    def deco(cls: type) -> type:
        if name in FORMS and type(FORMS[name]) is not cls:
            raise RuntimeError(f"storage form {name!r} registered twice")
        cls.name = name
        FORMS[name] = cls()
        return cls

    return deco


@functools.cache
def _scan(package: str) -> tuple[tuple[str, str], ...]:
    spec = importlib.util.find_spec(package)
    found = []
    for root in (spec.submodule_search_locations or []) if spec else []:
        for f in sorted(Path(root).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            mod = ".".join((package,) + (parts[:-1] if parts[-1] == "__init__" else parts))
            found.extend((name, mod) for name in _REGISTRATION.findall(f.read_text(encoding="utf-8")))
    return tuple(found)


def form_index() -> dict[str, str]:
    """Form name -> the module that registers it (read from the sources, nothing imported)."""
    out: dict[str, str] = {}
    for pkg in FORM_PACKAGES:
        for name, mod in _scan(pkg):
            out.setdefault(name, mod)
    return out


def form_names() -> list[str]:
    """Every known form: the v1 forms first, then the others by name."""
    names = set(form_index()) | set(FORMS)
    return [n for n in BUILTIN_ORDER if n in names] + sorted(names - set(BUILTIN_ORDER))


def get_form(name: str) -> StorageForm:
    """The storage form called ``name`` (its module is imported on first use)."""
    if name not in FORMS:
        mod = form_index().get(name)
        if mod is not None:
            importlib.import_module(mod)
    try:
        return FORMS[name]
    except KeyError:
        raise UserError(f"storage form {name!r} unknown; this llmpress knows {', '.join(form_names())}") from None


def form_of(state: LayerState) -> StorageForm | None:
    """The form a layer is stored in: the one its method asked for, else an integer grid
    (weight quantization arguments), else a sparse mask (pruned); None: stored as is."""
    if state.form is not None:
        return get_form(state.form)
    if state.weight_args is not None:
        return get_form("quant")
    if state.sparsity > 0:
        return get_form("sparse")
    return None


# ---- what the writers, the loader and the size accounting call ---------------------------


def encode_layer(weight: torch.Tensor, record) -> tuple[LinearSpec, dict[str, torch.Tensor]] | None:
    """(spec, tensors) of one compressed linear, or None when it is not compressed or its
    form cannot store this weight exactly (the caller then stores the weight dense)."""
    state = LayerState.of(record, weight.detach())
    form = form_of(state)
    return None if form is None else form.encode(state)


def decode_weight(spec: LinearSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [out, in] of a stored linear (what the compressed model holds)."""
    return get_form(spec.kind).decode(spec, tensors, dtype)


def record_bits(record, dense_bits: int = 16) -> float:
    """Bits per weight of a compressed linear (its form's count; ``dense_bits`` plus any
    extra storage a method accounted for when it has no form)."""
    state = LayerState.of(record)
    form = form_of(state)
    if form is None:
        return float(dense_bits) + state.extra_bits / state.n_params
    return form.bits_per_weight(state, dense_bits)


def counts_as_compressed(record) -> bool:
    """Whether eval/size.py counts the layer among the compressed ones."""
    form = form_of(LayerState.of(record))
    return form is not None and form.counts_as_compressed
