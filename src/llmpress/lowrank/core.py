"""Low-rank factorization of a linear's weight: W [m, n] ~ A [m, r] @ B [r, n].

The maths every low-rank method shares (no modules, no data loading):

- **Accounting** (the seeds' "Low-rank Approximation"): a factored linear stores and
  multiplies r(m + n) numbers instead of mn, so it saves parameters and MACs only while
  ``r < mn / (m + n)`` (the break-even rank); per token a dense linear costs mn MACs, the
  factored one r(m + n). :func:`rank_for_ratio` turns a target parameter ratio into a rank and
  refuses one that would not save anything.
- **Truncated SVD** with the singular values split evenly between the factors:
  ``A = U_r S_r^1/2``, ``B = S_r^1/2 V_r^T`` (:func:`svd_factors`).
- **Scaled factorization** (ASVD): factor ``W diag(s)`` and fold ``diag(s)^-1`` into B, so
  the truncation drops what matters least for inputs of typical magnitude ``s``.
- **Whitened factorization** (SVD-LLM): with ``H = X^T X = L L^T`` (Cholesky), the output
  error of any W_hat is ``tr((W - W_hat) H (W - W_hat)^T) = ||(W - W_hat) L||_F^2``; so
  factoring ``W L`` and folding ``L^-1`` into B makes each dropped singular value of ``W L``
  exactly the output error it costs (:func:`whitened_factors`). A Gram matrix that is not
  positive definite (dead input channels, fewer tokens than channels) gets a diagonal shift
  (:func:`whitening_factor`), reported with the layer.
- **Refit**: with B fixed, the A minimizing the output error is ``W H B^T (B H B^T)^-1``
  (:func:`refit_left`).
Everything runs in float64; the factors come back in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import RecipeError, UserError
from ..quant.args import QuantArgs, check_group_divides
from ..quant.core import quantize_weight

SHIFT_START = 1e-8  # first diagonal shift tried, as a fraction of mean(diag H)
SHIFT_GROWTH = 100.0
SHIFT_TRIES = 6


def break_even_rank(m: int, n: int) -> float:
    """The rank at which a factored [m, n] linear stores as many numbers as the dense one."""
    return m * n / (m + n)


def lowrank_params(m: int, n: int, r: int) -> int:
    """Numbers a rank-``r`` factorization of an [m, n] weight stores (= MACs per token)."""
    return r * (m + n)


def param_ratio(m: int, n: int, r: int) -> float:
    return lowrank_params(m, n, r) / (m * n)


def rank_for_ratio(m: int, n: int, ratio: float, what: str = "") -> int:
    """The largest rank whose factors hold at most ``ratio`` of an [m, n] weight's parameters;
    refused when that rank would not save parameters or is 0."""
    where = f"{what}: " if what else ""
    if not 0 < ratio <= 1:
        raise UserError(f"{where}low-rank parameter ratio {ratio} must be in (0, 1]")
    r = int(ratio * m * n // (m + n))
    return check_rank(m, n, r, what)


def check_rank(m: int, n: int, r: int, what: str = "") -> int:
    where = f"{what}: " if what else ""
    if r < 1:
        raise UserError(f"{where}rank {r} for a [{m}, {n}] weight: a factorization needs rank 1 or more (raise the ratio)")
    if lowrank_params(m, n, r) >= m * n:
        raise UserError(
            f"{where}rank {r} of a [{m}, {n}] weight stores {lowrank_params(m, n, r)} numbers, no fewer than the dense {m * n} "
            f"(break-even rank {break_even_rank(m, n):.1f}): a factorization would not save parameters"
        )
    return r


def svd_factors(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [m, r], B [r, n], all singular values) of ``M``'s rank-r truncation, sqrt(S) in each factor."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r], S


def scaled_factors(W: torch.Tensor, scale: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``W diag(scale)`` with ``diag(scale)^-1`` folded into B (ASVD)."""
    s = scale.double()
    A, B, _ = svd_factors(W.double() * s, r)
    return A, B / s


@dataclass(kw_only=True)
class Whitening:
    L: torch.Tensor  # lower Cholesky factor of H + shift * mean(diag H) * I, float64
    shift: float  # 0.0 when H itself was positive definite


def whitening_factor(H: torch.Tensor, what: str = "") -> Whitening:
    """Cholesky factor of the Gram matrix, with the smallest diagonal shift (x100 per try)
    that makes it positive definite."""
    Hd = H.double()
    if not torch.isfinite(Hd).all():
        raise UserError(f"{what + ': ' if what else ''}the input Gram matrix has non-finite entries")
    mean = float(torch.diagonal(Hd).abs().mean()) or 1.0
    eye = torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device)
    shift = 0.0
    for _ in range(SHIFT_TRIES + 1):
        L, info = torch.linalg.cholesky_ex(Hd + shift * mean * eye)
        if int(info) == 0:
            return Whitening(L=L, shift=shift)
        shift = SHIFT_START if shift == 0 else shift * SHIFT_GROWTH
    raise UserError(
        f"{what + ': ' if what else ''}the input Gram matrix stays indefinite with a shift of {shift / SHIFT_GROWTH:g} x its mean diagonal"
    )


def whitened_factors(W: torch.Tensor, L: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, singular values of ``W L``): the truncation of ``W L`` with ``L^-1`` folded into B."""
    A, M, S = svd_factors(W.double() @ L, r)
    # B = M L^-1  <=>  L^T B^T = M^T
    B = torch.linalg.solve_triangular(L.T, M.T, upper=True).T
    return A, B, S


def refit_left(W: torch.Tensor, B: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The A minimizing ``tr((W - A B) H (W - A B)^T)`` for fixed B: ``W H B^T (B H B^T)^-1``."""
    Wd, Bd, Hd = W.double(), B.double(), H.double()
    HB = Hd @ Bd.T  # [n, r]
    G = Bd @ HB  # [r, r]
    return torch.linalg.solve(G, (Wd @ HB).T).T


def output_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - A B) H (W - A B)^T)``: with H = X^T X, ``||X (W - A B)^T||_F^2``."""
    D = W.double() - A.double() @ B.double()
    return float(((D @ H.double()) * D).sum())


@dataclass(kw_only=True, frozen=True)
class RankTarget:
    """The size of a factorization: ``rank`` when given, else the largest rank whose factors
    hold at most ``ratio`` of the dense weight's parameters. ``weights``: both factors
    quantized to that grid (round to nearest; after a whitened method, B first and A refit to
    the quantized B in closed form, then quantized); with group quantization the rank of a
    ``ratio`` is rounded down to a multiple of the group size (A's input dimension is the rank).
    ``solver``: how the factors are put on that grid: ``rtn`` (round to nearest) or ``gptq``
    (each factor by GPTQ with its own input statistics: B's input is the layer's, Gram matrix
    H; A's is the latent B x, Gram matrix B H B^T; the methods that gather H only)."""

    ratio: float = 0.8
    rank: int | None = None
    weights: QuantArgs | None = None
    solver: str = "rtn"

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise UserError(f"low-rank parameter ratio {self.ratio} must be in (0, 1]")
        if self.rank is not None and self.rank < 1:
            raise UserError(f"low-rank rank {self.rank} must be 1 or more")
        if self.solver not in ("rtn", "gptq"):
            raise UserError(f"low-rank factor solver {self.solver!r}: expected rtn or gptq")
        if self.solver == "gptq" and self.weights is None:
            raise UserError("low-rank factor solver gptq: set weights (the grid the factors are quantized to)")

    replaces_weight = True  # the plan refuses stages after it on the same linear (llmpress.calib.plan)

    def check_layer(self, m: int, n: int, what: str = "") -> None:
        self.rank_of(m, n, what)

    def rank_of(self, m: int, n: int, what: str = "") -> int:
        if self.rank is not None:
            r = check_rank(m, n, self.rank, what)
        else:
            r = rank_for_ratio(m, n, self.ratio, what)
            g = self.weights.group_size if self.weights is not None and self.weights.granularity == "group" else 1
            r = check_rank(m, n, r // g * g, what) if r >= g else r
        if self.weights is not None:
            check_group_divides(self.weights, n, f"{what + ': ' if what else ''}factor B: ")
            check_group_divides(self.weights, r, f"{what + ': ' if what else ''}factor A (input = the rank {r}): ")
        return r

    def layer_rank(self, ctx) -> int:
        """The rank of the linear of ``ctx``: what a ``lowrank_alloc`` stage before it chose
        (``ctx.settings["rank"]``), else :meth:`rank_of`."""
        m, n = ctx.weight.shape
        return self.chosen_rank(m, n, ctx.settings.get("rank"), ctx.name)

    def chosen_rank(self, m: int, n: int, chosen, what: str = "") -> int:
        """The rank an allocation stage chose (``chosen``; None: :meth:`rank_of`), rounded down to
        a multiple of the factors' group size."""
        if chosen is None:
            return self.rank_of(m, n, what)
        r = int(chosen)
        if self.weights is not None and self.weights.granularity == "group":
            r = max(self.weights.group_size, r // self.weights.group_size * self.weights.group_size)
        r = check_rank(m, n, r, what)
        if self.weights is not None:
            check_group_divides(self.weights, r, f"{what}: factor A (input = the rank {r}): ")
        return r


def quantize_factors(A: torch.Tensor, B: torch.Tensor, args: QuantArgs, *, W: torch.Tensor | None = None, H: torch.Tensor | None = None,
                     name: str = "", gptq=None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """(A_q, B_q, their scales and zero points as payload tensors): B rounded to nearest (or by
    GPTQ on H: ``gptq`` is then the solver, ``llmpress.quant.gptq.gptq_quantize``, passed by the
    method so this maths module does not import a method); with the weight and its input Gram
    matrix (``W``, ``H``), A refit to the quantized B first (so A absorbs B's error), then
    rounded (or GPTQ on the latent's Gram matrix B_q H B_q^T)."""
    if gptq is not None:
        if W is None or H is None:
            raise UserError(f"{name}: factor solver gptq needs the layer's input statistics")
        Bq, qb = _gptq_factor(gptq, B, H, args, f"{name}.B")
        A = refit_left(W, Bq.double(), H)
        Aq, qa = _gptq_factor(gptq, A, Bq.double() @ H.double() @ Bq.double().T, args, f"{name}.A")
    else:
        Bq, qb = quantize_weight(B.float(), args, f"{name}.B")
        if W is not None and H is not None:
            A = refit_left(W, Bq.double(), H)
        Aq, qa = quantize_weight(A.float(), args, f"{name}.A")
    extra = {"A.scale": qa.scale, "B.scale": qb.scale}
    if qa.zero_point is not None:
        extra.update({"A.zero_point": qa.zero_point, "B.zero_point": qb.zero_point})
    return Aq, Bq, extra


def _gptq_factor(gptq, M: torch.Tensor, H: torch.Tensor, args: QuantArgs, name: str):
    """GPTQ with the settings of the ``gptq-*`` presets (activation order, static groups,
    damping 0.3 of the mean diagonal: the choice measured on held-out text, docs/second-order.md)."""
    res = gptq(M.float(), H.float(), args, act_order=True, static_groups=True, damp=0.3, name=name)
    return res.weight, res.qparams


def store_factors(module, record, A: torch.Tensor, B: torch.Tensor, *, args: QuantArgs | None = None, qparams: dict | None = None,
                  **notes) -> None:  # fmt: skip
    """Put the factors in a linear (its weight becomes ``A @ B``, computed as the storage
    form and the runtime module compute it) and in its record (form ``lowrank``; with
    ``args``, the factors are on that grid and ``qparams`` holds their scales)."""
    dtype = module.weight.dtype
    A, B = A.to(dtype).contiguous(), B.to(dtype).contiguous()
    module.weight.data.copy_(A @ B)
    record.form = "lowrank"
    record.payload = {"A": A, "B": B, **(qparams or {})}
    record.weight_args = args
    m, n = module.weight.shape
    record.notes.update(rank=int(A.shape[1]), param_ratio=round(param_ratio(m, n, int(A.shape[1])), 4), **notes)


def qkv_costs(hidden: int, q_dim: int, kv_dim: int, rank: int, layers: int = 1) -> dict[str, dict[str, int]]:
    """Parameters, MACs per token and cached numbers per token of q/k/v over ``layers`` layers:
    dense, factored separately (each of q, k, v at ``rank``: K and V cache their rank-r latents)
    and jointly (one factorization of [W_q; W_k; W_v], QSVD: one shared rank-r latent cached).
    ``q_dim`` = query heads x head dim, ``kv_dim`` = key/value heads x head dim (grouped-query
    attention: kv_dim < q_dim). With equal heads (q_dim = kv_dim = E = hidden) this is the seeds'
    6LrE / 6rE / 2rL (separate) against 4LrE / 4rE / rL (joint)."""
    E, out = hidden, q_dim + 2 * kv_dim
    sep = rank * (3 * E + q_dim + 2 * kv_dim)
    joint = rank * (E + out)
    return {
        "dense": {"params": layers * E * out, "macs": E * out, "cache": layers * 2 * kv_dim},
        "separate": {"params": layers * sep, "macs": sep, "cache": layers * 2 * rank},
        "joint": {"params": layers * joint, "macs": joint, "cache": layers * rank},
    }


def qsvd_ratios(hidden: int, q_dim: int, kv_dim: int, rank: int) -> tuple[float, float]:
    """(R1, R2) of a joint q/k/v factorization: its parameters over the dense q/k/v's, its cached
    latent over the K/V cache it replaces. Equal heads: R1 = 4r/(3E), R2 = r/(2E) = 0.375 R1."""
    c = qkv_costs(hidden, q_dim, kv_dim, rank)
    return c["joint"]["params"] / c["dense"]["params"], c["joint"]["cache"] / c["dense"]["cache"]


def stage_linears(model, spec, stage, data, method: str) -> dict[str, tuple[int, int]]:
    """[out, in] of each linear a model-scope allocation stage targets (in model order); refuses
    a stage without calibration data or matching no linear."""
    if data is None:
        raise RecipeError(f"{method} needs calibration data")
    prefix = spec.blocks + "."
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear) and stage.matches(n, n.startswith(prefix))}
    if not shapes:
        raise RecipeError(f"{method}: no linear matches targets {list(stage.targets)}")
    return shapes
