"""SpinQuant (Liu et al. 2024): learn the rotations on calibration data.

The rotations R1 (residual stream, d x d) and R2 (per-head values, one head_dim x
head_dim matrix per block) are optimized on the orthogonal group to minimize the
next-token cross-entropy of the *quantized* rotated network; the online Hadamards (R3 on
q/k after RoPE, R4 before down_proj, and the attention-output one) stay fixed.

Training simulation (nothing is folded until the end): every decoder linear is swapped
for a :class:`_SimLinear` computing ``Qa(x) Qw(L^T W R)^T`` with the rotations as live
tensors, the embedding output is multiplied by R1 and the head input by R1^T (the head is
not quantized, so that equals a rotated head), and the online rotations and the KV-cache
quantizer run through the same runtime modules as at inference. Quantizers use a
straight-through estimator (round treated as identity in the backward pass).

Optimizer: Cayley SGD with momentum on the Stiefel manifold (here the orthogonal group).
With the Euclidean gradient G of a rotation R, the skew matrix A = G R^T - R G^T gives
the descent curve R(a) = (I + a/2 A)^-1 (I - a/2 A) R, orthogonal for every a (Cayley
transform); momentum accumulates A. The solve is done in float64, so R^T R stays equal to
I to ~1e-13; the forward pass uses float32 copies.

Budget (CPU): a step is a forward and backward pass of the model on ``batch x seqlen``
tokens; with float weights in the loss (default) the rotations are applied to the
activations (a few tokens x d^2 products per block), with quantized weights every weight
is re-rotated and fake-quantized each step (d^2 work per weight matrix per step). The
default 40 steps of 1 x 256 tokens from 16 calibration windows take a few minutes on 2
cores. The paper uses 100 steps of 800 samples x 2048 tokens on GPUs; this is a
small-budget version.

Gemma3: its post-norms block the residual rotation (see :mod:`.rotate`); R1 is then not
learned -- the norm outputs get the fixed online Hadamard, as in QuaRot -- and only R2
is learned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import progress
from ..arch import ArchSpec, get_module, set_module
from ..errors import UserError
from ..quant.args import QuantArgs
from ..quant.core import fake_quantize
from ..registry import register
from ..runtime.kv_quant import attention_runtime, detach_attention_runtime
from ..runtime.online_hadamard import attach_mlp_input, detach_mlp_input
from .hadamard import orthogonal_matrix
from .rotation import (
    RotationPlan,
    apply_plan,
    attention_of,
    check_uniform_blocks,
    fuse_norms,
    head_layout,
    hidden_size,
    leaf,
    mlp_of,
    online,
    residual_rotatable,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- Cayley SGD


def cayley_step(r: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, lr: float, momentum: float, max_step: float | None = None):
    """One Cayley SGD step on the orthogonal group: (new R, new momentum buffer). float64.

    ``max_step``: trust region, the step ``lr * ||M||_F`` (about ||R_new - R||_F) is
    scaled down to at most this.
    """
    a = grad @ r.T - r @ grad.T  # skew-symmetric: the (canonical) Riemannian gradient direction
    buf = a if buf is None else momentum * buf + a
    if max_step is not None:
        norm = buf.norm().item()
        if lr * norm > max_step:
            lr = max_step / norm
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    new = torch.linalg.solve(eye + 0.5 * lr * buf, (eye - 0.5 * lr * buf) @ r)
    return new, buf


def orthogonality_error(r: torch.Tensor) -> float:
    """||R^T R - I||_F."""
    return (r.T @ r - torch.eye(r.shape[0], dtype=r.dtype, device=r.device)).norm().item()


class CayleySGD:
    """Cayley SGD with momentum over a list of square orthogonal leaf tensors (float64)."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float = 0.9, max_step: float | None = None):
        self.params, self.lr, self.momentum, self.max_step = params, lr, momentum, max_step
        self.bufs: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            new, self.bufs[i] = cayley_step(p.data, p.grad.to(p.dtype), self.bufs[i], lr, self.momentum, self.max_step)
            p.data.copy_(new)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


# ----------------------------------------------------------------------------- simulation


def _ste(x: torch.Tensor, args: QuantArgs | None) -> torch.Tensor:
    if args is None:
        return x
    return x + (fake_quantize(x, args) - x).detach()


class _SimLinear(nn.Module):
    """A decoder linear during training: weight recomputed from the live rotations."""

    def __init__(self, orig: nn.Linear, role: str, sim: _Sim, layer: int, right_fixed: torch.Tensor | None = None):
        super().__init__()
        self.orig, self.role, self.sim, self.layer = orig, role, sim, layer
        w = orig.weight.detach().float()
        if right_fixed is not None and role != "o":
            w = w @ right_fixed.float().T  # fixed online rotation of the input (down_proj)
        self.register_buffer("base", w, persistent=False)
        self.right_fixed = None if right_fixed is None else right_fixed.float()
        self.bias_ = None if orig.bias is None else orig.bias.detach().float()

    @property
    def in_features(self):
        return self.orig.in_features

    @property
    def out_features(self):
        return self.orig.out_features

    def weight_and_bias(self):
        s, w, b = self.sim, self.base, self.bias_
        r1 = s.r1f
        r2 = s.r2f[self.layer] if s.r2f is not None else None
        hd = s.head_dim
        if self.role in ("q", "k", "gate", "up", "norm_reader"):
            if r1 is not None:
                w = w @ r1
        elif self.role == "v":
            if r1 is not None:
                w = w @ r1
            if r2 is not None:
                w = torch.einsum("ji,hjd->hid", r2, w.view(-1, hd, w.shape[1])).reshape(w.shape)
                if b is not None:
                    b = (b.view(-1, hd) @ r2).reshape(-1)
        elif self.role == "o":
            if r2 is not None:
                w = (w.view(w.shape[0], -1, hd) @ r2).reshape(w.shape)
            if self.right_fixed is not None:
                w = w @ self.right_fixed.T
            if r1 is not None:
                w = r1.T @ w
                if b is not None:
                    b = b @ r1
        elif self.role == "down":
            if r1 is not None:
                w = r1.T @ w
                if b is not None:
                    b = b @ r1
        return _ste(w, s.wq), b

    def forward(self, x):
        s = self.sim
        if s.rotate_weights:  # quantized weights in the loss: rebuild W_eff every step
            w, b = self.weight_and_bias()
            return F.linear(_ste(x, s.aq), w, b)
        # float weights: rotate the (quantized) activations instead, O(tokens * d^2)
        xq = s.quantized_input(x)
        r1 = s.r1f
        r2 = s.r2f[self.layer] if s.r2f is not None else None
        hd, role, b = s.head_dim, self.role, self.bias_
        if role in ("q", "k", "v", "gate", "up"):
            y = F.linear(s.unrotated(xq) if r1 is not None else xq, self.base, b)  # x R1^T W^T
            if role == "v" and r2 is not None:
                y = (y.reshape(*y.shape[:-1], -1, hd) @ r2).reshape(y.shape)
            return y
        u = xq
        if role == "o":
            if self.right_fixed is not None:
                u = u @ self.right_fixed  # undo the online rotation x -> x M^T
            if r2 is not None:
                u = (u.reshape(*u.shape[:-1], -1, hd) @ r2.T).reshape(u.shape)
        y = F.linear(u, self.base)  # down: base already holds W M^T
        if r1 is not None:
            y = y @ r1
            if b is not None:
                b = b @ r1
        return y if b is None else y + b


class _Sim:
    """Installs the training-time simulation on a model (norms already fused) and removes it."""

    def __init__(self, model, spec, cfg, r1, r2, o_rot, down_rot, qk_rot):
        self.model, self.spec = model, spec
        self.r1, self.r2 = r1, r2
        self.wq, self.aq = cfg.weights, cfg.activations
        self.rotate_weights = cfg.weights is not None
        self.r1f = None
        self.r2f = None
        self.cache: dict = {}
        layers = get_module(model, spec.blocks)
        self.head_dim = head_layout(attention_of(layers[0], spec))[0]
        self.swapped: list[tuple[str, nn.Module]] = []
        self.handles = []
        self.attn_prev = []
        for i, block in enumerate(layers):
            prefix = f"{spec.blocks}.{i}"
            roles = {spec.q: "q", spec.k: "k", spec.v: "v", spec.o: "o", spec.up: "up", spec.down: "down"}
            if spec.gate:
                roles[spec.gate] = "gate"
            for local, role in roles.items():
                lin = get_module(block, local)
                fixed = None
                if role == "o" and o_rot is not None:
                    fixed = o_rot.matrix()
                if role == "down" and down_rot is not None:
                    fixed = down_rot.matrix()
                set_module(block, local, _SimLinear(lin, role, self, i, fixed))
                self.swapped.append((f"{prefix}.{local}", lin))
            attn = attention_of(block, spec)
            prev = getattr(attn, "llmpress_attn", None)
            self.attn_prev.append(None if prev is None else (prev.qk_rot, prev.o_rot, prev.key_args, prev.value_args))
            rt = attention_runtime(attn)
            rt.qk_rot, rt.o_rot = qk_rot, o_rot
            rt.key_args, rt.value_args = cfg.kv_keys, cfg.kv_values
            if down_rot is not None:
                attach_mlp_input(mlp_of(block, spec), leaf(spec.gate), leaf(spec.up), leaf(spec.down), down_rot)
        if r1 is not None:
            emb = get_module(model, spec.embed)
            head = get_module(model, spec.lm_head)
            self.handles.append(emb.register_forward_hook(lambda _m, _i, out: out @ self.r1f))
            self.handles.append(head.register_forward_pre_hook(lambda _m, inp: (inp[0] @ self.r1f.T,)))

    def refresh(self) -> None:
        self.r1f = None if self.r1 is None else self.r1.float()
        self.r2f = None if self.r2 is None else [r.float() for r in self.r2]
        self.cache = {}

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """Q_a(x), shared by the linears reading the same tensor (q/k/v, gate/up)."""
        key = ("q", id(x))
        if key not in self.cache:
            self.cache[key] = (x, _ste(x, self.aq))  # keep x alive so its id stays unique
        return self.cache[key][1]

    def unrotated(self, xq: torch.Tensor) -> torch.Tensor:
        """xq R1^T, shared likewise."""
        key = ("r", id(xq))
        if key not in self.cache:
            self.cache[key] = (xq, xq @ self.r1f.T)
        return self.cache[key][1]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for name, lin in self.swapped:
            set_module(self.model, name, lin)
        layers = get_module(self.model, self.spec.blocks)
        for i, block in enumerate(layers):
            detach_mlp_input(mlp_of(block, self.spec))
            attn = attention_of(block, self.spec)
            detach_attention_runtime(attn)
            prev = self.attn_prev[i]
            if prev is not None:
                rt = attention_runtime(attn)
                rt.qk_rot, rt.o_rot, rt.key_args, rt.value_args = prev


# ----------------------------------------------------------------------------- method


def _a4() -> QuantArgs:
    return QuantArgs(bits=4, symmetric=True, granularity="token")


def _kv4() -> QuantArgs:
    return QuantArgs(bits=4, symmetric=False, granularity="token")


@dataclass(kw_only=True, frozen=True)
class SpinQuant:
    """Learned rotations. ``weights`` / ``activations`` / ``kv_keys`` / ``kv_values``: the
    quantizers simulated in the training loss (match them to the stages that follow).
    ``weights: null`` (default) learns with float weights, as the paper does before GPTQ;
    it lets the loop rotate activations (tokens x d^2) instead of rebuilding and
    fake-quantizing every weight each step (much cheaper on CPU). Set it to the RTN
    quantizer to make the rotation weight-aware.
    ``steps`` Cayley SGD steps of ``batch`` windows of ``seqlen`` tokens drawn from the
    first ``windows`` calibration windows; ``lr`` with linear decay to 0; ``max_step``
    caps ||R_new - R||_F per step (a trust region: the loss of a 4-bit network is rough).
    ``val_windows`` held-out calibration windows (the ones after the training windows)
    score the rotations before training and every ``val_every`` steps; the best scoring
    rotations are kept, so the result is never worse than the initialization on held-out
    data (0 turns the guard off and keeps the last iterate)."""

    steps: int = 40
    lr: float = 1.5
    momentum: float = 0.9
    max_step: float = 1.0
    windows: int = 16
    seqlen: int = 256
    batch: int = 1
    seed: int = 0
    init: str = "random_hadamard"
    learn_residual: bool = True
    learn_values: bool = True
    val_windows: int = 4
    val_every: int = 10
    weights: QuantArgs | None = None
    activations: QuantArgs | None = field(default_factory=_a4)
    kv_keys: QuantArgs | None = field(default_factory=_kv4)
    kv_values: QuantArgs | None = field(default_factory=_kv4)
    online_down: bool = True
    online_o: bool = True
    rotate_qk: bool = True

    def __post_init__(self):
        if self.steps < 0 or self.windows < 1 or self.seqlen < 2 or self.batch < 1:
            raise UserError("spinquant: steps >= 0, windows >= 1, seqlen >= 2, batch >= 1 required")
        if self.val_windows < 0 or self.val_every < 1:
            raise UserError("spinquant: val_windows >= 0 and val_every >= 1 required")
        if self.init not in ("random_hadamard", "hadamard", "random"):
            raise UserError(f"spinquant.init {self.init!r}: expected random_hadamard, hadamard or random")


def _ce(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _status(losses: list[float], trace: list[tuple[int, float]], best: float | None) -> str:
    """``loss 3.214, held-out 3.301 (best 3.287)``: the progress bar's status."""
    parts = [f"loss {losses[-1]:.3f}"] if losses else []
    if trace:
        parts.append(f"held-out {trace[-1][1]:.3f}" + (f" (best {best:.3f})" if best is not None and best != trace[-1][1] else ""))
    return ", ".join(parts)


def learn_rotations(model, spec, cfg: SpinQuant, windows: torch.Tensor, r1_init, r2_init, o_rot, down_rot, qk_rot, val: torch.Tensor | None = None):
    """Cayley-SGD training of (R1, [R2]) on ``windows``; returns them (float64), the loss
    curve and the held-out trace [(step, loss)] (with ``val`` windows: the best iterate)."""
    r1 = None if r1_init is None else r1_init.clone().requires_grad_(cfg.learn_residual)
    r2 = None if r2_init is None else [q.clone().requires_grad_(cfg.learn_values) for q in r2_init]
    params = ([r1] if r1 is not None and cfg.learn_residual else []) + (r2 if r2 is not None and cfg.learn_values else [])
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    sim = _Sim(model, spec, cfg, r1, r2, o_rot, down_rot, qk_rot)
    opt = CayleySGD(params, cfg.lr, cfg.momentum, cfg.max_step)
    g = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    trace: list[tuple[int, float]] = []
    best: tuple[float, list[torch.Tensor]] | None = None

    def validate(step: int) -> None:
        nonlocal best
        sim.refresh()
        with torch.no_grad():
            chunks = val.split(cfg.batch)
            v = sum(_ce(model, ids).item() for ids in chunks) / len(chunks)
        trace.append((step, v))
        if best is None or v < best[0]:
            best = (v, [p.detach().clone() for p in params])
        log.info("spinquant held-out loss %.4f after %d steps (best %.4f)", v, step, best[0])
        bar.set_info(_status(losses, trace, best[0]))

    t0 = time.perf_counter()
    bar = progress.bar(cfg.steps, "spinquant rotations", "step")
    try:
        if val is not None:
            validate(0)
        with torch.enable_grad():
            for step in range(cfg.steps):
                idx = torch.randint(0, windows.shape[0], (cfg.batch,), generator=g)
                sim.refresh()
                loss = _ce(model, windows[idx])
                opt.zero_grad()
                loss.backward()
                opt.step(cfg.lr * (1.0 - step / max(cfg.steps, 1)))
                losses.append(loss.item())
                if step % 5 == 0 or step == cfg.steps - 1:
                    mom = opt.bufs[0].norm().item() if opt.bufs and opt.bufs[0] is not None else 0.0
                    log.info("spinquant step %d/%d loss %.4f |M| %.3g (%.0fs)", step + 1, cfg.steps, losses[-1], mom, time.perf_counter() - t0)
                if val is not None and ((step + 1) % cfg.val_every == 0 or step == cfg.steps - 1):
                    validate(step + 1)
                bar.update(1, _status(losses, trace, best[0] if best else None))
        if best is not None:
            with torch.no_grad():
                for p, b in zip(params, best[1]):
                    p.copy_(b)
        bar.close()
    finally:
        bar.close(finished=False)  # no-op after a normal close
        sim.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    out_r1 = None if r1 is None else r1.detach()
    out_r2 = None if r2 is None else [q.detach() for q in r2]
    return out_r1, out_r2, losses, trace


@register("spinquant", SpinQuant, scope="model", summary="SpinQuant: Cayley-SGD-learned residual and per-head rotations (+ fixed Hadamards)")
def spinquant(model: nn.Module, spec: ArchSpec, calib_windows, stage) -> None:
    cfg: SpinQuant = stage.config
    check_uniform_blocks(model, spec, "spinquant")
    if calib_windows is None:
        raise UserError("spinquant needs calibration windows")
    t = time.perf_counter()
    residual_ok = residual_rotatable(spec)
    if residual_ok:  # gemma3: the norm outputs are rotated online with their gains (see rotate.apply_plan)
        fuse_norms(model, spec, final=True)
    layers = get_module(model, spec.blocks)
    n = len(layers)
    hd, n_h, _ = head_layout(attention_of(layers[0], spec))
    if not residual_ok:  # gemma3: fixed online Hadamard on the norm outputs, applied first
        d = hidden_size(model, spec)
        rot = online(d, "hadamard", cfg.seed, "norm output")
        apply_plan(model, spec, RotationPlan(norm_in=[(rot, rot)] * n, notes={"method": "spinquant (norm outputs)"}))
    r1 = orthogonal_matrix(hidden_size(model, spec), cfg.init, cfg.seed, "residual")[0] if residual_ok else None
    q0 = orthogonal_matrix(hd, "hadamard" if cfg.init != "random" else "random", cfg.seed + 1, "head_dim")[0]
    r2 = [q0.clone() for _ in range(n)]
    o_rot = online(hd * n_h, "hadamard", cfg.seed + 2, "attention output") if cfg.online_o else None
    inter = get_module(layers[0], spec.down).in_features
    down_rot = online(inter, "hadamard", cfg.seed + 3, "down_proj input") if cfg.online_down else None
    qk_rot = online(hd, "hadamard", cfg.seed + 4, "q/k head") if cfg.rotate_qk else None
    windows = calib_windows[: cfg.windows, : cfg.seqlen]
    val = None
    if cfg.val_windows and cfg.steps:
        val = calib_windows[cfg.windows : cfg.windows + cfg.val_windows, : cfg.seqlen]
        if val.shape[0] < cfg.val_windows:  # not enough calibration windows: the training set's last ones
            val = windows[-min(cfg.val_windows, windows.shape[0]) :]
            log.warning("spinquant: fewer than windows + val_windows calibration windows; held-out scoring uses training windows")
    r1, r2, losses, trace = learn_rotations(model, spec, cfg, windows, r1, r2, o_rot, down_rot, qk_rot, val)
    best_step = min(trace, key=lambda t: t[1])[0] if trace else cfg.steps
    errs = [orthogonality_error(r) for r in ([r1] if r1 is not None else []) + r2]
    plan = RotationPlan(
        residual=r1, values=r2, o_in=[o_rot] * n if o_rot else None, down_in=[down_rot] * n if down_rot else None, qk=[qk_rot] * n if qk_rot else None
    )
    plan.notes = {
        "method": "spinquant",
        "steps": cfg.steps,
        "tokens_per_step": cfg.batch * int(windows.shape[1]),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "heldout_loss": trace,
        "kept_step": best_step,
        "max_orthogonality_error": max(errs) if errs else 0.0,
        "learned": (["R1"] if r1 is not None and cfg.learn_residual else []) + (["R2"] if cfg.learn_values else []),
        "seconds": round(time.perf_counter() - t, 1),
    }
    model.llmpress_spinquant_losses = losses  # type: ignore[attr-defined]
    summary = apply_plan(model, spec, plan)
    log.info("spinquant: %s", summary)
