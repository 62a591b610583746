"""QSVD (Wang, Wang and Zhang, NeurIPS 2025): one joint low-rank factorization of q, k and v.

q_proj, k_proj and v_proj read the same input x (the attention norm's output), so their
weights stack into one ``W = [W_q; W_k; W_v]`` of shape [d_q + 2 d_kv, E]. QSVD factors it
once, ``W ~ A B`` with B [r, E] shared and A split by rows into A_q, A_k, A_v: per token the
attention computes the latent ``h = x B^T`` (r numbers) and ``q = h A_q^T``, ``k = h A_k^T``,
``v = h A_v^T``; a latent KV cache keeps h instead of K and V (r numbers per token and layer
instead of 2 d_kv). Here the factorization is whitened as SVD-LLM's (:mod:`llmpress.lowrank.svd_llm`):
with the input Gram matrix ``H = X^T X = L L^T`` over the calibration tokens, the truncation of
``W L`` drops exactly the output error of q, k and v together, and A is refit in closed form.

Grouped-query attention (SmolLM2: 9 query heads, 3 key/value heads of 64) only changes the
shapes: d_q = 576, d_kv = 192, so the stacked weight is [960, 576] and the cost formulas of
:func:`llmpress.lowrank.core.qkv_costs` apply. The rank comes from ``ratio`` of the stacked
weight's parameters (``r (d_q + 2 d_kv + E) <= ratio (d_q + 2 d_kv) E``), ``rank``, or the joint
rank a ``lowrank_alloc`` stage with ``joint: qkv`` chose for the block (QSVD's importance-based
allocation; ranks chosen per linear are refused: q, k and v share one).

Storage: each of q/k/v is a ``lowrank`` layer; k_proj and v_proj store only their A and name
q_proj's B as shared (``meta.shared``), so B is stored once. A block-scope stage: it needs
the three linears at once and gathers H itself from the block's calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import get_module
from ..calib.accumulators import HessianAccumulator
from ..errors import RecipeError
from ..quant.gptq_solve import gptq_quantize
from ..registry import register
from .core import RankTarget, output_error, quantize_factors, refit_left, store_factors, whitened_factors, whitening_factor


@dataclass(kw_only=True, frozen=True)
class QSVD(RankTarget):
    refit: bool = True

    def check_layer(self, m: int, n: int, what: str = "") -> None:
        """The rank is checked on the stacked q/k/v weight, when the block is reached."""


def input_gram(ctx, local: str) -> torch.Tensor:
    """X^T X (scaled as the engine's Hessian) of the input of sub-module ``local`` over all the
    block's calibration batches (every rank's)."""
    acc = HessianAccumulator()
    handle = get_module(ctx.block, local).register_forward_pre_hook(lambda _m, args: acc.add(args[0].detach()))
    try:
        ctx.run()
    finally:
        handle.remove()
    return acc.result().double()


@register("qsvd", QSVD, scope="block", summary="QSVD: one whitened SVD of [W_q; W_k; W_v] with a shared right factor (latent K/V)")
def qsvd(ctx, cfg: QSVD) -> None:
    spec = ctx.spec
    locs = (spec.q, spec.k, spec.v)
    missing = [loc for loc in locs if loc not in ctx.targets]
    if missing:
        raise RecipeError(f"qsvd factors q, k and v together: block {ctx.index} lacks {missing} among its targets ({sorted(ctx.targets)})")
    lins = [get_module(ctx.block, loc) for loc in locs]
    W = torch.cat([lin.weight.data for lin in lins]).double()
    m, n = W.shape
    chosen = {ctx.settings.get(loc, {}).get("rank") for loc in locs}
    if len(chosen) > 1:
        raise RecipeError(
            f"qsvd block {ctx.index}: q, k and v were given different ranks {sorted(chosen, key=str)} by an allocation stage; "
            "QSVD factors them with one rank: use lowrank_alloc with joint: qkv"
        )
    r = cfg.chosen_rank(m, n, chosen.pop(), f"qsvd block {ctx.index} (stacked q/k/v [{m}, {n}])")
    H = input_gram(ctx, spec.q)
    wh = whitening_factor(H, f"qsvd block {ctx.index}")
    A, B, S = whitened_factors(W, wh.L, r)
    Hr = H if wh.shift == 0 else wh.L @ wh.L.T
    if cfg.refit:
        A = refit_left(W, B, Hr)
    q = None
    if cfg.weights is not None:
        A, B, q = quantize_factors(A, B, cfg.weights, W=W, H=Hr, name=f"qsvd block {ctx.index}", gptq=gptq_quantize if cfg.solver == "gptq" else None)
    err = output_error(W, A, B, H)
    B = B.to(lins[0].weight.dtype).contiguous()
    q_name = f"{ctx.prefix}.{spec.q}"
    start = 0
    for loc, lin in zip(locs, lins):
        rows = lin.out_features
        rec = ctx.record(loc)
        rec.methods.append("qsvd")
        fq = None
        if q is not None:  # this linear's rows of A's scales (one row of scales per output row)
            fq = {k: (v[start : start + rows] if k.startswith("A.") and v.shape[0] == A.shape[0] else v) for k, v in q.items()}
        store_factors(
            lin, rec, A[start : start + rows], B, args=cfg.weights, qparams=fq, whitening_shift=wh.shift, output_error_qkv=err, joint_rank=r
        )
        if loc != spec.q:
            rec.notes["shared"] = {"B": q_name}  # stored once, with q_proj
            rec.payload.update({k: v for k, v in ctx.records[q_name].payload.items() if k == "B" or k.startswith("B.")})  # the same tensors
        start += rows
