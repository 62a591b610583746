"""Quantization arguments: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import RecipeError, UserError

KINDS = ("int", "ternary", "binary")
GRANULARITIES = ("tensor", "channel", "group", "token")
OBSERVERS = ("minmax", "mse", "lsq")
IMPORTANCE_OBSERVERS = ("mse", "lsq")  # the observers whose search a per-input-column importance weights
SCALE_DTYPES = ("float32", "float16")


@dataclass(kw_only=True, frozen=True)
class QuantArgs:
    """How to quantize one tensor.

    ``bits``: 2-8 for integers (ternary is 2-bit storage, binary 1-bit).
    ``granularity``: ``tensor`` (one scale), ``channel`` (one per output row of a weight),
    ``group`` (one per ``group_size`` consecutive input columns of a row), ``token``
    (activations: one per token row). ``observer``: ``minmax``, ``mse`` (grid search
    of a clipping ratio minimizing the lp error of each group) or ``lsq`` (integers: llama.cpp's
    imatrix scale search: for ``2 lsq_steps + 1`` candidate scales, the extreme on
    ``N + k lsq_step`` steps instead of the rule's ``N``, round, refit the scale by weighted
    least squares, keep the one of least weighted squared error; ``lsq_magnitude``: each
    value's weight also times ``sqrt(sigma^2 + x^2)``, ``sigma^2`` the mean square of its
    row, as llama.cpp's ``Q4_0`` / ``Q5_0`` weigh it; see :func:`llmpress.quant.core._lsq_search`). ``full_range``
    (symmetric integers): ``S = max|x| / (qmax + 1/2)`` so that all ``2^b`` codes are
    used (the positive extreme clips by half a step; the convention of llm-compressor
    and compressed-tensors), instead of ``S = max|x| / qmax`` (``2^b - 1`` codes).
    ``signed_scale`` (symmetric integers, instead of ``full_range``): the sign-aware scale
    of llama.cpp's reference ``Q4_0``: ``S = x_m / qmin`` with ``x_m`` the group's signed
    value of largest magnitude, so that ``x_m`` lands exactly on the code ``qmin = -2^(b-1)``
    and the other side gets up to ``qmax * |S|``; ``S`` is negative where ``x_m`` is
    positive (ties: the negative value, a positive scale). All ``2^b`` codes are used and
    no value clips by half a step, as ``full_range``'s positive extreme does.
    ``clip_ratio`` (integers): a fixed clipping of each group's range, ``[c*min, c*max]``,
    values beyond clamp to the extreme codes (QuaRot clips activations at 0.9 and the KV
    cache at 0.95: after a rotation the values are near Gaussian and a slightly smaller
    step wins more than the clamped tail loses).
    ``scale_dtype`` (integers): ``float16`` rounds every scale to a float16 value (and,
    asymmetric, to one whose products with the zero points are float16 values too), so
    that formats storing fp16 scales (GGUF ``Q4_0`` / ``Q8_0`` / ``Q4_1``) hold the grid
    exactly; ``float32`` (default) keeps the scales as computed.
    ``super_block`` (symmetric integer groups with ``scale_dtype: float16``): the two-level
    scales of GGUF's ``Q6_K``: the groups of each run of ``super_block`` input columns
    share one float16 ``d`` and each group's scale is ``d * sc``, ``sc`` an int8 code
    (``d = s_m / -128``, ``s_m`` the run's signed group scale of largest magnitude, whose
    code is then exactly -128; a code 0 becomes 1, so no scale vanishes). The weights'
    codes are rounded against these stored scales. ``Q6_K``: ``bits: 6, group_size: 16,
    super_block: 256, signed_scale: true``. ``group_scale_bits`` (default 8) is the width of
    the ``sc`` codes: ``d = s_m / -2^(k-1)``, codes in ``-2^(k-1) .. 2^(k-1) - 1``; GGUF's
    ``Q3_K`` stores 6-bit codes: ``bits: 3, group_size: 16, super_block: 256, signed_scale:
    true, group_scale_bits: 6``.
    """

    bits: int = 4
    kind: str = "int"
    symmetric: bool = True
    granularity: str = "group"
    group_size: int | None = 64
    observer: str = "minmax"
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    mse_norm: float = 2.4
    lsq_steps: int = 9  # candidates each side of the rule's scale (llama.cpp's make_qx_quants: 9)
    lsq_step: float = 0.1  # their spacing, in grid steps of the extreme (llama.cpp: 0.1)
    lsq_magnitude: bool = False  # weights also by sqrt(sigma^2 + x^2), sigma^2 the row's mean square (llama.cpp's Q4_0 / Q5_0)
    ternary_threshold: float = 0.7  # s = ternary_threshold * mean|W| (per group)
    scale_bits: int = 16  # storage of scales, for bits-per-weight accounting
    full_range: bool = False
    signed_scale: bool = False
    clip_ratio: float = 1.0
    scale_dtype: str = "float32"
    super_block: int | None = None
    group_scale_bits: int = 8  # super_block: the width of each group's scale code

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RecipeError(f"quant kind {self.kind!r} unknown; expected one of {', '.join(KINDS)}")
        if self.kind == "ternary" and self.bits != 2:
            object.__setattr__(self, "bits", 2)
        if self.kind == "binary" and self.bits != 1:
            object.__setattr__(self, "bits", 1)
        if self.kind == "int" and not (2 <= int(self.bits) <= 8):
            raise RecipeError(f"bits={self.bits!r}: integer quantization supports 2 to 8 bits")
        if self.granularity not in GRANULARITIES:
            raise RecipeError(f"granularity {self.granularity!r} unknown; expected one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise RecipeError(f"group_size={self.group_size!r}: granularity 'group' needs a positive integer group_size")
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)
        if self.full_range and (self.kind != "int" or not self.symmetric):
            raise RecipeError("full_range applies to symmetric integer grids (kind: int, symmetric: true)")
        if self.signed_scale and (self.kind != "int" or not self.symmetric):
            raise RecipeError("signed_scale applies to symmetric integer grids (kind: int, symmetric: true)")
        if self.signed_scale and self.full_range:
            raise RecipeError(
                "signed_scale and full_range are two rules for the symmetric scale (x_m / -2^(b-1) or max|x| / (2^(b-1) - 1/2)); choose one"
            )
        if self.observer not in OBSERVERS:
            raise RecipeError(f"observer {self.observer!r} unknown; expected one of {', '.join(OBSERVERS)}")
        if not (isinstance(self.clip_ratio, (int, float)) and 0.0 < self.clip_ratio <= 1.0):
            raise RecipeError(f"clip_ratio={self.clip_ratio!r} must lie in (0, 1]")
        if self.clip_ratio != 1.0 and self.kind != "int":
            raise RecipeError("clip_ratio applies to integer grids (kind: int)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise RecipeError(f"scale_dtype {self.scale_dtype!r} unknown; expected one of {', '.join(SCALE_DTYPES)}")
        if self.scale_dtype != "float32" and self.kind != "int":
            raise RecipeError("scale_dtype applies to integer grids (kind: int)")
        if self.super_block is not None:
            self._check_super_block()
        elif self.group_scale_bits != 8:
            raise RecipeError(f"group_scale_bits={self.group_scale_bits!r} applies to two-level scales (super_block)")
        if not 0.0 < self.mse_maxshrink < 1.0:
            raise RecipeError(f"mse_maxshrink={self.mse_maxshrink!r} must lie in (0, 1)")
        self._check_lsq()

    def _check_lsq(self) -> None:
        k, step = self.lsq_steps, self.lsq_step
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 100:
            raise RecipeError(f"lsq_steps={k!r}: expected an integer number of candidates each side in [0, 100]")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step <= 1.0:
            raise RecipeError(f"lsq_step={step!r}: expected a candidate spacing in (0, 1] grid steps")
        if not isinstance(self.lsq_magnitude, bool):
            raise RecipeError(f"lsq_magnitude={self.lsq_magnitude!r}: expected true or false")
        if self.observer != "lsq":
            if self.lsq_magnitude:
                raise RecipeError(f"lsq_magnitude weights the lsq observer's search; observer is {self.observer}")
            return
        if self.kind != "int":
            raise RecipeError(f"observer lsq applies to integer grids (kind: int), not {self.kind}")
        if k * step >= self.lsq_span:
            raise RecipeError(
                f"lsq_steps * lsq_step = {k * step:g} must stay below the {self.lsq_span:g} grid steps of the scale rule "
                "(the largest candidate scale would be infinite)"
            )

    @property
    def lsq_span(self) -> float:
        """The grid steps the scale rule puts between 0 and the extreme (symmetric) or between
        the minimum and the maximum (asymmetric): scale = extreme / lsq_span."""
        if not self.symmetric:
            return float(self.qmax - self.qmin)
        if self.signed_scale:
            return float(-self.qmin)
        return self.qmax + (0.5 if self.full_range else 0.0)

    @property
    def takes_importance(self) -> bool:
        """Whether the observer's search weights each input column's error by an importance
        (GPTQ, SparseGPT and AdaRound pass diag(H))."""
        return self.kind == "int" and self.observer in IMPORTANCE_OBSERVERS

    def _check_super_block(self) -> None:
        sb, g = self.super_block, self.group_size
        if isinstance(sb, bool) or not isinstance(sb, int) or sb < 1:
            raise RecipeError(f"super_block={sb!r}: expected a positive number of input columns (Q6_K: 256)")
        if self.kind != "int" or not self.symmetric or self.granularity != "group" or self.scale_dtype != "float16":
            raise RecipeError(
                "super_block applies to symmetric integer groups with float16 scales (kind: int, symmetric: true, granularity: group, scale_dtype: float16)"
            )
        if sb % g or sb // g < 2:
            raise RecipeError(f"super_block={sb} must be a multiple (2 or more) of group_size {g}")
        k = self.group_scale_bits
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 8:
            raise RecipeError(f"group_scale_bits={k!r}: expected 2 to 8 bits per group scale code (Q6_K: 8, Q3_K: 6)")

    @property
    def qmin(self) -> int:
        if self.kind != "int":
            return -1
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        if self.kind != "int":
            return 1
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def has_zero_point(self) -> bool:
        return self.kind == "int" and not self.symmetric

    def describe(self) -> str:
        g = {"group": f"g{self.group_size}", "channel": "per-channel", "tensor": "per-tensor", "token": "per-token"}[self.granularity]
        kind = {"int": f"int{self.bits}", "ternary": "ternary", "binary": "binary"}[self.kind]
        sym = "" if self.kind != "int" else (" sym" if self.symmetric else " asym")
        sym += " signed-scale" if self.signed_scale else ""
        desc = (
            f"{kind}{sym} {g}"
            + (f" {self.observer}" if self.observer != "minmax" else "")
            + (f" clip{self.clip_ratio:g}" if self.clip_ratio != 1.0 else "")
        )
        desc += f" in {self.super_block}s" if self.super_block else ""
        desc += f" ({self.group_scale_bits}-bit group scales)" if self.group_scale_bits != 8 else ""
        return desc + (" fp16-scales" if self.scale_dtype == "float16" else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["scale_dtype"] == "float32":  # the default left out: manifests written before the field stay byte for byte
            del d["scale_dtype"]
        for key, default in (
            ("signed_scale", False),
            ("super_block", None),
            ("group_scale_bits", 8),
            ("lsq_steps", 9),
            ("lsq_step", 0.1),
            ("lsq_magnitude", False),
        ):  # likewise
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "quant") -> QuantArgs:
        if isinstance(d, QuantArgs):
            return d
        if not isinstance(d, dict):
            raise RecipeError(f"{where}: expected a mapping of quantization arguments, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise RecipeError(f"{where}: unknown field(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None
        except TypeError as e:
            raise RecipeError(f"{where}: {e}") from None


def check_group_divides(args: QuantArgs, in_features: int, where: str = "") -> None:
    """Refuse group quantization whose group size does not divide the input dimension (the
    one place this is checked: the plan, GPTQ and SparseGPT call it)."""
    if args.granularity == "group" and in_features % args.group_size:
        raise UserError(f"{where}group_size {args.group_size} does not divide the input dimension {in_features}")
    if args.super_block and in_features % args.super_block:
        raise UserError(f"{where}super_block {args.super_block} does not divide the input dimension {in_features}")
