"""DuQuant (Lin et al. 2024): outlier-driven block rotations and a zigzag permutation.

For the activations X [tokens, d] that feed some linears, DuQuant builds

    x -> ((x R1) P) R2

with R1, R2 block-diagonal (blocks of b channels) and P a permutation, all orthogonal,
and folds the inverse into the weights (W -> W R1 P R2).

- Block rotation (greedy, per block): take the channel with the largest |x| in the
  block; rotate so that this channel is spread evenly over the block (a Householder
  reflection mapping e_d to the uniform vector u = 1/sqrt(b), followed by a random
  rotation of the complement of u, which keeps the spread outlier spread and mixes the
  rest); keep the step only if the block's max |x| drops; repeat ``steps`` times.
- Zigzag permutation: sort channels by their max |x| after R1 and deal them to the
  blocks 0, 1, .., K-1, K-1, .., 0, 0, 1, ..: every block gets a similar share of the
  large channels, so the second rotation R2 can flatten each block.

Where the invariance allows (see :mod:`llmpress.transform.rotate`):
- llama family: one transform of the residual stream, built from the inputs of every
  q/k/v and gate/up (norm outputs, norms fused), applied offline (dense d x d); or, with
  ``residual: online``, one transform per block and norm output, applied at run time;
- every block: an online transform of the down_proj input and of the attention output
  (o_proj input), built from that block's own activations (two b x b batched matmuls and
  a gather per token);
- gemma3 (post-norms block the residual): online transforms of each block's
  input_layernorm and pre_feedforward_layernorm outputs, built per block;
- values and q/k per head: Hadamard, as in QuaRot (the KV cache needs them; DuQuant
  itself does not rotate the cache).

Smoothing (``smooth``, the paper's first step, before the rotations and the permutation):
per equivalence point of every block (norm -> q/k/v, v -> o, norm -> gate/up, up -> down;
:mod:`llmpress.transform.scaling`) a per-channel scale

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

from the calibration activations, folded like SmoothQuant's (norm weight / v_proj rows /
up_proj rows divided, the readers' columns multiplied: the float model is unchanged). The
rotation statistics are then taken on the smoothed model. ``smooth_alpha`` = 0.6 is the value
of the authors' released runs; ``smooth_alpha: auto`` searches it per point instead: for each
alpha of ``smooth_grid`` and for no smoothing at all, the point's calibration rows X (largest
and random tokens) and its readers' weights W are smoothed, the DuQuant transform R of the
smoothed rows is built, and both sides are quantized as the later stages will
(weights RTN ``search_weight_bits`` sym g64, activations per token ``search_act_bits`` sym):

    err(alpha) = sum over readers ||X W^T - Q_a(X/s R^T) Q_w(W s R^T)^T||^2

the alpha of least error is kept (the transform summary lists the choices). With
``residual: offline`` the norm points are left out: the residual rotation fuses the norm gains
into the readers, which would undo a norm scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import progress
from ..arch import ArchSpec, get_module
from ..errors import UserError
from ..quant.args import QuantArgs
from ..quant.core import fake_quantize
from ..registry import register
from ..runtime.online_hadamard import OnlineRotation, block_matmul
from .hadamard import orthogonal_matrix, random_orthogonal
from .rotation import (
    RotationPlan,
    apply_plan,
    attention_of,
    check_uniform_blocks,
    fuse_norms,
    head_layout,
    online,
    residual_rotatable,
)
from .scaling import apply_smoothing, group_weight_absmax, head_geometry, heads_to_kv, kv_to_heads, scale_groups, smooth_scales

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pure functions


def spreading_rotation(b: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """A b x b orthogonal R with e_d R = u (uniform 1/sqrt(b)) and u R random in u's complement."""
    u = torch.full((b,), 1.0 / b**0.5, dtype=torch.float64)
    e = torch.zeros(b, dtype=torch.float64)
    e[d] = 1.0
    v = e - u
    nv = v.dot(v)
    house = torch.eye(b, dtype=torch.float64) if nv < 1e-24 else torch.eye(b, dtype=torch.float64) - 2.0 * torch.outer(v, v) / nv
    if b <= 2:
        return house
    # orthonormal basis of u's complement, a random rotation inside it, u kept fixed
    basis = torch.linalg.qr(torch.cat([u[:, None], torch.randn(b, b - 1, generator=generator, dtype=torch.float64)], 1))[0][:, 1:]
    q = random_orthogonal(b - 1, generator)
    keep_u = torch.outer(u, u) + basis @ q @ basis.T
    return house @ keep_u


def greedy_block_rotation(x: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Orthogonal R [b, b] lowering max |x R| greedily, for samples x [n, b] of one block."""
    b = x.shape[1]
    r = torch.eye(b, dtype=torch.float64)
    cur = x.double()
    best = cur.abs().max()
    for _ in range(steps):
        d = int(cur.abs().amax(0).argmax())
        rt = spreading_rotation(b, d, generator)
        cand = cur @ rt
        m = cand.abs().max()
        if m >= best:
            break
        cur, best, r = cand, m, r @ rt
    return r


def block_rotations(x: torch.Tensor, block: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Per-block greedy rotations [K, b, b] for x [n, K*b]."""
    k = x.shape[1] // block
    return torch.stack([greedy_block_rotation(x[:, i * block : (i + 1) * block], steps, generator) for i in range(k)])


def zigzag_permutation(channel_max: torch.Tensor, blocks: int) -> torch.Tensor:
    """perm with x[:, perm] grouping channels into blocks by zigzag order of channel_max."""
    d = channel_max.numel()
    b = d // blocks
    order = torch.argsort(channel_max, descending=True)
    groups: list[list[int]] = [[] for _ in range(blocks)]
    for rank, ch in enumerate(order.tolist()):
        cycle, pos = divmod(rank, blocks)
        groups[pos if cycle % 2 == 0 else blocks - 1 - pos].append(ch)
    assert all(len(g) == b for g in groups)
    return torch.tensor([c for g in groups for c in g], dtype=torch.long)


def pick_block(d: int, block: int) -> int:
    """The requested block size if it divides d, else the largest power of two <= it that does."""
    if d % block == 0:
        return block
    b = 1
    while b * 2 <= block and d % (b * 2) == 0:
        b *= 2
    return b


def duquant_transform(x: torch.Tensor, block: int = 64, steps: int = 16, seed: int = 0) -> OnlineRotation:
    """DuQuant's rotation-permutation-rotation for activation samples x [n, d] (an OnlineRotation)."""
    d = x.shape[1]
    b = pick_block(d, block)
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    r1 = block_rotations(x, b, steps, g)
    y = block_matmul(x, r1)
    perm = zigzag_permutation(y.abs().amax(0), d // b)
    y = y[:, perm]
    r2 = block_rotations(y, b, steps, g)
    return OnlineRotation(d, "blocks", blocks=(r1, perm, r2))


# ----------------------------------------------------------------------------- statistics


class RowSampler:
    """Keeps, per site, the rows with the largest |x| (outlier tokens) and a random sample."""

    def __init__(self, top: int, rand: int, generator: torch.Generator):
        self.top, self.rand, self.g = top, rand, generator
        self.rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        k = min(self.top, x.shape[0])
        idx = x.abs().amax(1).topk(k).indices
        r = torch.randint(0, x.shape[0], (min(self.rand, x.shape[0]),), generator=self.g)
        self.rows.append(torch.cat([x[idx], x[r]]))

    def result(self) -> torch.Tensor:
        return torch.cat(self.rows)


def collect_inputs(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, sites: dict[str, str], batch: int, top: int, rand: int, seed: int):
    """Row samples of the inputs of ``sites`` (name -> local linear path) for every block."""
    g = torch.Generator().manual_seed(seed)
    layers = get_module(model, spec.blocks)
    samplers = {(i, s): RowSampler(top, rand, g) for i in range(len(layers)) for s in sites}
    handles = []
    for i, block in enumerate(layers):
        for s, path in sites.items():

            def hook(_m, inp, _k=(i, s)):
                samplers[_k].add(inp[0])

            handles.append(get_module(block, path).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in progress.track(windows.split(batch), "duquant statistics", "batch"):
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v.result() for k, v in samplers.items()}


@dataclass(kw_only=True, frozen=True)
class AlphaSearch:
    """How ``smooth_alpha: auto`` scores a candidate (see the module doc)."""

    grid: tuple[float, ...]
    block_size: int
    steps: int
    seed: int
    weights: QuantArgs
    activations: QuantArgs


def smoothing_error(
    x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor | None, search: AlphaSearch, seed: int, refs: list[torch.Tensor] | None = None
) -> float:
    """sum_W ||x W^T - Q_a(x/s R^T) Q_w(W s R^T)^T||^2 with R DuQuant's transform of x/s
    (``s`` None: no smoothing); x [n, d] float32, each W [out, d] in the same column space.
    ``refs``: the products x W^T when the caller has them (one per candidate otherwise)."""
    refs = refs if refs is not None else [x @ w.T for w in weights]
    xs = x if s is None else x / s
    rot = duquant_transform(xs, search.block_size, search.steps, seed).matrix().float()
    xq = fake_quantize(xs @ rot.T, search.activations)
    wargs = search.weights
    if x.shape[1] % wargs.group_size:  # a width the group does not divide: one scale per row
        wargs = QuantArgs(bits=wargs.bits, symmetric=True, granularity="channel")
    err = 0.0
    for w, ref in zip(weights, refs):
        ws = w if s is None else w * s
        wq = fake_quantize(ws @ rot.T, wargs)
        err += float((ref - xq @ wq.T).pow(2).sum())
    return err


@torch.no_grad()
def smooth_model(
    model: nn.Module, spec: ArchSpec, windows: torch.Tensor, alpha: float | str, norms: bool = True, batch: int = 4, search: AlphaSearch | None = None
) -> tuple[int, list[dict[str, float | None]]]:
    """DuQuant's smoothing step: per block and equivalence point, the SmoothQuant scale from
    the calibration activations' per-channel max |x| (``alpha``, or with ``search`` the
    candidate of least :func:`smoothing_error`, None meaning not smoothed), folded into the
    block (the float function is unchanged). ``norms``: include the norm -> linears points.
    Returns the number of points smoothed and, per block, the alpha chosen at each point."""
    layers = get_module(model, spec.blocks)
    groups = [g for g in scale_groups(spec) if norms or g.kind != "norm"]
    if not groups:
        return 0, []
    absmax: dict[tuple[int, int], torch.Tensor] = {}
    gen = torch.Generator().manual_seed(search.seed if search else 0)
    samplers = {(i, k): RowSampler(64, 512, gen) for i in range(len(layers)) for k in range(len(groups))} if search else {}
    handles = []
    for i, block in enumerate(layers):
        for k, g in enumerate(groups):

            def hook(_m, inp, _key=(i, k)):
                m = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(0).float()
                absmax[_key] = m if _key not in absmax else torch.maximum(absmax[_key], m)
                if _key in samplers:
                    samplers[_key].add(inp[0])

            handles.append(get_module(block, g.linears[0]).register_forward_pre_hook(hook))
    try:
        for ids in progress.track(windows.split(batch), "duquant smoothing statistics", "batch"):
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    chosen: list[dict[str, float | None]] = []
    with progress.bar(len(layers) * len(groups), "duquant alpha search", "point", on=None if search else False) as bar:
        for i, block in enumerate(layers):
            picks: dict[str, float | None] = {}
            for k, g in enumerate(groups):
                act = absmax[(i, k)]
                geo = head_geometry(block, spec) if g.kind == "v" else None
                if geo is not None:
                    act = heads_to_kv(act, geo, "max")
                w_absmax = group_weight_absmax(block, spec, g)
                a: float | None = alpha
                if search:
                    a = _search_alpha(samplers.pop((i, k)).result(), block, g, act, w_absmax, geo, search, i * len(groups) + k)
                    bar.update(1, f"block {i} {g.prev}: {a}")
                picks[g.prev] = a
                if a is not None:
                    apply_smoothing(block, spec, g, smooth_scales(act, w_absmax, a))
            chosen.append(picks)
    return sum(a is not None for p in chosen for a in p.values()), chosen


def _search_alpha(x, block, g, act, w_absmax, geo, search: AlphaSearch, seed: int) -> float | None:
    """The grid's alpha (or None: no smoothing) of least :func:`smoothing_error` at one point."""
    weights = [get_module(block, p).weight.detach().float() for p in g.linears]
    refs = [x @ w.T for w in weights]
    cols = (lambda t: kv_to_heads(t, geo)) if geo is not None else (lambda t: t)
    best, best_err = None, smoothing_error(x, weights, None, search, search.seed + seed, refs)
    for a in search.grid:
        err = smoothing_error(x, weights, cols(smooth_scales(act, w_absmax, a)), search, search.seed + seed, refs)
        if err < best_err:
            best, best_err = a, err
    return best


# ----------------------------------------------------------------------------- method


@dataclass(kw_only=True, frozen=True)
class DuQuant:
    """DuQuant rotations. ``block_size`` b of the block rotations, ``steps`` greedy steps per
    block, statistics from ``windows`` calibration windows (``top``/``random`` token rows per
    block and site). ``residual``: ``offline`` (one transform of the residual stream from all
    blocks' norm outputs, folded into weights; llama family) or ``online`` (a transform per
    block and norm output, applied at run time, as the paper does per layer; always the case
    for gemma3)."""

    block_size: int = 64
    steps: int = 16
    seed: int = 0
    windows: int = 8
    top: int = 64
    random: int = 512
    online_down: bool = True
    online_o: bool = True
    rotate_values: bool = True
    rotate_qk: bool = True
    residual: str = "offline"
    smooth: bool = True
    smooth_alpha: float | str = 0.6
    smooth_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    search_weight_bits: int = 4
    search_act_bits: int = 4

    def __post_init__(self):
        if self.block_size < 2 or self.steps < 0 or self.windows < 1:
            raise UserError("duquant: block_size >= 2, steps >= 0 and windows >= 1 required")
        if not isinstance(self.smooth, bool):
            raise UserError(f"duquant.smooth {self.smooth!r}: expected true or false")
        a = self.smooth_alpha
        if a != "auto" and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
            raise UserError(f"duquant.smooth_alpha {a!r}: expected a value in [0, 1] or auto")
        if not self.smooth_grid or any(isinstance(v, bool) or not 0.0 <= v <= 1.0 for v in self.smooth_grid):
            raise UserError(f"duquant.smooth_grid {list(self.smooth_grid)!r}: expected a non-empty list of values in [0, 1]")
        for k in ("search_weight_bits", "search_act_bits"):
            if isinstance(getattr(self, k), bool) or getattr(self, k) not in range(2, 9):
                raise UserError(f"duquant.{k} {getattr(self, k)!r}: expected an integer from 2 to 8")
        if self.residual not in ("offline", "online"):
            raise UserError(f"duquant.residual {self.residual!r}: expected offline or online")


@register("duquant", DuQuant, scope="model", summary="DuQuant: greedy block rotations + zigzag permutation (residual / online per block)")
def duquant(model: nn.Module, spec: ArchSpec, calib_windows, stage) -> None:
    cfg: DuQuant = stage.config
    check_uniform_blocks(model, spec, "duquant")
    if calib_windows is None:
        raise UserError("duquant needs calibration windows")
    offline = residual_rotatable(spec) and cfg.residual == "offline"
    if offline:  # statistics of the plain norm outputs the residual rotation will see
        fuse_norms(model, spec, final=True)
    windows = calib_windows[: cfg.windows]
    search = None
    if cfg.smooth_alpha == "auto":
        search = AlphaSearch(
            grid=tuple(cfg.smooth_grid),
            block_size=cfg.block_size,
            steps=cfg.steps,
            seed=cfg.seed,
            weights=QuantArgs(bits=cfg.search_weight_bits, symmetric=True, granularity="group", group_size=64),
            activations=QuantArgs(bits=cfg.search_act_bits, symmetric=True, granularity="token"),
        )
    smoothed, alphas = smooth_model(model, spec, windows, cfg.smooth_alpha, norms=not offline, search=search) if cfg.smooth else (0, [])
    layers = get_module(model, spec.blocks)
    n = len(layers)
    hd, n_h, _ = head_layout(attention_of(layers[0], spec))
    sites = {"attn_in": spec.q, "mlp_in": spec.gate or spec.up}
    if cfg.online_o:
        sites["o_in"] = spec.o
    if cfg.online_down:
        sites["down_in"] = spec.down
    samples = collect_inputs(model, spec, windows, sites, batch=4, top=cfg.top, rand=cfg.random, seed=cfg.seed)

    plan = RotationPlan()
    q_values = None
    if cfg.rotate_values:
        q_values, _ = orthogonal_matrix(hd, "hadamard", cfg.seed + 1, "head_dim")
        plan.values = [q_values] * n
    total = (1 if offline else 2 * n) + n * (int(cfg.online_o) + int(cfg.online_down))
    with progress.bar(total, "duquant search", "rotation") as bar:

        def search(x: torch.Tensor, seed: int, what: str) -> OnlineRotation:
            rot = duquant_transform(x, cfg.block_size, cfg.steps, seed)
            bar.update(1, what)
            return rot

        if offline:
            x = torch.cat([samples[(i, s)] for i in range(n) for s in ("attn_in", "mlp_in")])
            plan.residual = search(x, cfg.seed, "residual").matrix().T.contiguous()
        else:
            plan.norm_in = [tuple(search(samples[(i, s)], cfg.seed + i, f"block {i} {s}") for s in ("attn_in", "mlp_in")) for i in range(n)]
        if cfg.online_o:
            big_q = torch.block_diag(*([q_values] * n_h)).float() if q_values is not None else None
            plan.o_in = []
            for i in range(n):
                x = samples[(i, "o_in")]
                if big_q is not None:
                    x = x @ big_q  # the attention output after the per-head value rotation
                plan.o_in.append(search(x, cfg.seed + 1000 + i, f"block {i} o_in"))
        if cfg.online_down:
            plan.down_in = [search(samples[(i, "down_in")], cfg.seed + 2000 + i, f"block {i} down_in") for i in range(n)]
    if cfg.rotate_qk:
        plan.qk = [online(hd, "hadamard", cfg.seed + 4, "q/k head")] * n
    plan.notes = {
        "method": "duquant",
        "block_size": cfg.block_size,
        "steps": cfg.steps,
        "windows": int(windows.shape[0]),
        "residual_mode": "offline" if offline else "online",
        "smooth_alpha": cfg.smooth_alpha if cfg.smooth else None,
        "smoothed_points": smoothed,
        "smooth_alphas": alphas if search else None,
    }
    summary = apply_plan(model, spec, plan)
    log.info("duquant: %s", summary)
