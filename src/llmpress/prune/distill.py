"""Recovery by knowledge distillation: a short training run of a compressed (student) model
towards the full model's (teacher's) next-token distributions on calibration windows.

Loss per token position (Hinton et al. 2015), with temperature T:

    T^2 * KL( softmax(z_teacher / T) || softmax(z_student / T) )

averaged over every position of a batch. AdamW on every floating-point parameter of the
student (``train="all"``), only on its norm gains and biases (``"norms"``: few parameters,
little memory), or on low-rank adapters of the block linears merged into the weights afterwards
(``"lora"``, :mod:`llmpress.prune.lora`: gradients and AdamW moments for r(m + n) numbers per
linear instead of mn). Batches are drawn with a seeded generator, so a run is reproducible.
The last ``held_out`` windows are not trained on: the KL before, every ``check_every`` steps
and after is measured on them (two forwards of a few windows instead of the whole set), the
parameters of the lowest held-out KL are what the run keeps (the start's, when no check beat
it), and a check above the best so far puts the best parameters back and divides the learning
rate by 3 (at most ``backoff`` times): a learning rate too high for a close start costs a few
checks instead of the whole run. ``seqlen`` cuts the windows shorter for training: a token costs less in a short
window (attention) and more steps fit a budget. :func:`kl_to_teacher` measures the same KL
(T = 1) on any windows.

Two ways to run it in a recipe: a structured stage's own ``recover_steps`` (:class:`Recovery`:
the teacher is the model as it was before that stage), or a ``distill`` stage after the
pruning stages (:mod:`llmpress.prune.distill_stage`: the teacher is the model as the recipe received it,
so several cuts, e.g. query heads then MLP channels, recover together towards the full model).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..arch import get_arch, get_module
from ..errors import RecipeError
from ..progress import track
from ..registry import get_method
from ..runtime.head import agrees, chunk_tokens, head_logits, split_head
from .lora import LoRA

log = logging.getLogger(__name__)

TRAIN = ("all", "norms", "lora")

__all__ = ["Distill", "Recovery", "current_original", "distill", "kl_to_teacher", "original_model"]


@dataclass(kw_only=True, frozen=True)
class Distill:
    """``steps`` optimizer steps of ``batch_size`` windows at learning rate ``lr`` (AdamW,
    weight decay 0), ``temperature`` T, ``train`` all parameters, only ``norms`` or ``lora``
    adapters of rank ``lora_rank`` (scale ``lora_alpha / lora_rank``); ``checkpoint``: the
    decoder blocks' activations are recomputed in the backward instead of kept (less memory,
    about a third more compute); ``seed``
    draws the batches; ``held_out`` windows (at most; never more than an eighth) kept aside
    for the KL; ``seqlen`` > 0 cuts the training windows to that many tokens; the held-out KL
    is checked every ``check_every`` steps (0: only at the end), the best parameters kept, and
    up to ``backoff`` checks that rose cut the learning rate by 3. Also the config of the
    recipe stage ``distill`` (:mod:`llmpress.prune.distill_stage`)."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    temperature: float = 1.0
    train: str = "all"
    seed: int = 0
    held_out: int = 8
    seqlen: int = 0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    checkpoint: bool = False
    check_every: int = 25
    backoff: int = 2
    keeps_original: ClassVar[bool] = True  # as a recipe stage: compress keeps a frozen copy of the model it received

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise RecipeError("distillation: steps must be >= 0 and batch_size >= 1")
        if self.held_out < 0 or self.seqlen < 0 or 0 < self.seqlen < 2:
            raise RecipeError("distillation: held_out must be >= 0 and seqlen 0 (as given) or >= 2")
        if not self.lr > 0 or not self.temperature > 0:
            raise RecipeError("distillation: lr and temperature must be positive")
        if self.train not in TRAIN:
            raise RecipeError(f"distillation: train={self.train!r}: expected one of {', '.join(TRAIN)}")
        if self.lora_rank < 1 or not self.lora_alpha > 0:
            raise RecipeError(f"distillation: lora_rank={self.lora_rank!r} must be >= 1 and lora_alpha={self.lora_alpha!r} positive")
        for k in ("check_every", "backoff"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise RecipeError(f"distillation: {k}={v!r} must be a whole number >= 0")

    def check_position(self, index: int, stages) -> None:
        """As recipe stage ``index`` of ``stages``: refused first (nothing to recover: the
        teacher would be the model itself) or after a stage of the sequential engine (model-
        scope stages run before the engine, so it would train before that stage, not after)."""
        if index == 0:
            raise RecipeError("recipe stage 0 (distill): nothing before it to recover from; put it after the pruning stages")
        late = next((j for j in range(index) if get_method(stages[j].method).scope != "model"), None)
        if late is not None:
            raise RecipeError(
                f"recipe stage {index} (distill) runs before the quantization stages (model-wide stages run first): "
                f"put it before stage {late} ({stages[late].method})"
            )


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of T^2 KL(p_teacher || p_student) at temperature T."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _heads(student: nn.Module, teacher: nn.Module, probe: torch.Tensor) -> tuple | None:
    """(student's, teacher's) (decoder, head, softcap) when both models' logits are a per-token
    head over their decoder's output (checked on ``probe``), so the loss can be taken a chunk of
    tokens at a time; None: the plain way."""
    parts = split_head(student), split_head(teacher)
    if parts[0] is None or parts[1] is None:
        return None
    with torch.no_grad():
        return parts if agrees(student, parts[0], probe) and agrees(teacher, parts[1], probe) else None


def _chunk_kl(h_s: torch.Tensor, h_t: torch.Tensor, s_head, s_cap, t_head, t_cap, temperature: float) -> torch.Tensor:
    """Sum over the chunk's positions of KL(p_teacher || p_student) at temperature T."""
    s = F.log_softmax(head_logits(s_head, s_cap, h_s) / temperature, dim=-1)
    with torch.no_grad():
        t = F.log_softmax(head_logits(t_head, t_cap, h_t) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


def _loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, temperature: float, heads: tuple | None) -> torch.Tensor:
    """:func:`_kl` of the two models on ``ids``. With ``heads`` (:func:`_heads`) the heads and the
    loss run a chunk of positions at a time under activation checkpointing, so neither model's
    [batch, seq, vocab] logits (nor their log-softmax and gradient copies) exist at once: the
    backward recomputes one chunk's logits at a time. The same value up to summation order."""
    if heads is None:
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
        return _kl(student(input_ids=ids, use_cache=False).logits, target, temperature)
    (s_body, s_head, s_cap), (t_body, t_head, t_cap) = heads
    h_s = s_body(input_ids=ids, use_cache=False).last_hidden_state
    with torch.no_grad():
        h_t = t_body(input_ids=ids, use_cache=False).last_hidden_state
    h_s, h_t = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    n = h_s.shape[0]
    # several logit-sized tensors live at once in a chunk's loss and backward: a smaller floor than eval's
    step = chunk_tokens(getattr(s_head, "out_features", 0), h_s.shape[-1], share=16)
    total = h_s.new_zeros((), dtype=torch.float32)
    for i in range(0, n, step):
        args = (h_s[i : i + step], h_t[i : i + step], s_head, s_cap, t_head, t_cap, temperature)
        total = total + (checkpoint(_chunk_kl, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_kl(*args))
    return total / n * temperature**2


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean per-token KL(teacher || student) (T = 1, nats) over ``windows`` [n, L]."""
    dev = next(student.parameters()).device
    heads = _heads(student, teacher, windows[:1, :8].to(dev))
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(dev)
        total += float(_loss(student, teacher, ids, 1.0, heads)) * ids.numel()
        count += ids.numel()
    return total / max(count, 1)


def _trainable(model: nn.Module, train: str) -> list[nn.Parameter]:
    out, seen = [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        if train == "all" or "norm" in name or name.endswith(".bias"):
            out.append(p)
    return out


def split(windows: torch.Tensor, cfg: Distill) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(training windows, measured windows, how many are held out) of ``windows`` [n, L]: the
    last min(held_out, n // 8) are held out (when that is none, every window is trained on and
    measured), and the training ones are cut to ``seqlen`` tokens (a shorter rest is dropped)."""
    n = windows.shape[0]
    k = min(cfg.held_out, n // 8)
    train, held = (windows[: n - k], windows[n - k :]) if k else (windows, windows)
    if cfg.seqlen and cfg.seqlen < train.shape[1]:
        per = train.shape[1] // cfg.seqlen
        train = train[:, : per * cfg.seqlen].reshape(-1, cfg.seqlen)
    return train, held, k


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: Distill = Distill()) -> dict:
    """Train ``student`` in place towards ``teacher`` on ``windows`` [n, L] (less the held-out
    ones, :func:`split`); returns the held-out KL before and after, the steps, the checks and
    the seconds taken. The student ends with the parameters of the lowest held-out KL among
    the start and the checks (``kept`` False: the start's, ``kl_trained`` the KL the run
    reached); LoRA adapters are merged into the weights when the run is kept and dropped
    otherwise."""
    windows, held, n_held = split(windows, cfg)
    lora = LoRA(student, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed) if cfg.train == "lora" else None
    params = lora.parameters() if lora else _trainable(student, cfg.train)
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    try:
        kl_before = kl_to_teacher(student, teacher, held, cfg.batch_size)
        run = _train(student, teacher, windows, held, params, cfg, kl_before)
    except BaseException:
        if lora:
            lora.remove()
        raise
    finally:
        for p in student.parameters():
            p.requires_grad_(flags[id(p)])
    kept = run["best_kl"] < kl_before
    if lora:
        lora.merge() if kept else lora.remove()
    if not kept:  # no check beat the start (learning rate too high for a close start): the start is kept
        log.warning("distillation: held-out KL %.4f never went below %.4f in %d steps; the weights before it are kept (lower lr)",
                    run["kl_trained"], kl_before, cfg.steps)  # fmt: skip
    else:
        log.info("distillation: KL %.4f -> %.4f in %d steps", kl_before, run["best_kl"], cfg.steps)
    return {"kl_before": kl_before, "kl_after": run["best_kl"] if kept else kl_before, "kl_trained": run["kl_trained"], "kept": kept,
            "steps": cfg.steps, "best_step": run["best_step"], "checks": run["checks"], "backoffs": run["backoffs"], "lr_final": run["lr"],
            "seconds": time.perf_counter() - t0, "held_out": n_held, "train": cfg.train,
            "trained_parameters": sum(p.numel() for p in params),
            "train_tokens": cfg.steps * cfg.batch_size * windows.shape[1]}  # fmt: skip


def _train(
    student: nn.Module, teacher: nn.Module, windows: torch.Tensor, held: torch.Tensor, params: list[nn.Parameter], cfg: Distill, kl_before: float
) -> dict:
    """``cfg.steps`` AdamW steps on ``params`` of the KL of ``student`` to ``teacher`` on
    batches drawn (seeded) from ``windows``, the held-out KL on ``held`` checked every
    ``cfg.check_every`` steps and at the end; ends with ``params`` at the best check (or as
    they started). Returns the best KL and its step, the last check's KL, every check, the
    backoffs taken and the learning rate reached."""
    dev = next(student.parameters()).device
    lr = cfg.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    heads = _heads(student, teacher, windows[:1, :8].to(dev))
    best = [p.detach().clone() for p in params]  # one copy, updated in place: the start, then the best check
    best_kl, best_step, last_kl, checks, backoffs = kl_before, 0, kl_before, [], 0
    was_training = student.training
    student.train(False)  # no dropout: the student is trained as it is served
    try:
        with _block_checkpointing(student, cfg.checkpoint):
            for step in track(range(1, cfg.steps + 1), "distillation", "step"):
                ids = windows[torch.randint(0, windows.shape[0], (cfg.batch_size,), generator=gen)].to(dev)
                loss = _loss(student, teacher, ids, cfg.temperature, heads)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step != cfg.steps and not (cfg.check_every and step % cfg.check_every == 0):
                    continue
                last_kl = kl_to_teacher(student, teacher, held, cfg.batch_size)
                checks.append([step, last_kl])
                with torch.no_grad():
                    if last_kl < best_kl:
                        best_kl, best_step = last_kl, step
                        for b, p in zip(best, params):
                            b.copy_(p)
                        continue
                    for b, p in zip(best, params):  # the check rose: back to the best parameters
                        p.copy_(b)
                if step < cfg.steps and backoffs < cfg.backoff:
                    backoffs += 1
                    lr /= 3.0
                    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # fresh moments from the best point
                    log.info("distillation: held-out KL %.4f above the best %.4f at step %d; lr -> %.3g", last_kl, best_kl, step, lr)
    finally:
        opt.zero_grad(set_to_none=True)
        student.train(was_training)
    return {"best_kl": best_kl, "best_step": best_step, "kl_trained": last_kl, "checks": checks, "backoffs": backoffs, "lr": lr}


@contextmanager
def _block_checkpointing(model: nn.Module, on: bool) -> Iterator[None]:
    """transformers' activation checkpointing of the decoder blocks, on while inside. It acts
    only on a block whose ``training`` flag is set: the flag is set on the blocks themselves,
    not on their sub-modules, so dropout inside stays off."""
    if not on:
        yield
        return
    enable, disable = getattr(model, "activation_checkpointing_enable", None), getattr(model, "activation_checkpointing_disable", None)
    if not callable(enable) or not callable(disable) or not getattr(model, "supports_gradient_checkpointing", False):
        raise RecipeError(f"distillation: checkpoint=true needs a transformers model that supports it, not {type(model).__name__}")
    blocks = list(get_module(model, get_arch(model).blocks))
    enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for b in blocks:
        b.training = True
    try:
        yield
    finally:
        for b in blocks:
            b.training = False
        disable()


@dataclass(kw_only=True, frozen=True)
class Recovery:
    """The recovery settings of a structured stage (drop_layers, prune_width, slicegpt):
    ``recover_steps`` distillation steps (0: none) towards the model as it was before the
    stage, at ``recover_lr``, on windows cut to ``recover_seqlen`` tokens (0: as given),
    training ``recover_train`` (all, norms or lora; LoRA of rank ``recover_lora_rank``), the
    blocks' activations recomputed in the backward with ``recover_checkpoint``."""

    recover_steps: int = 0
    recover_lr: float = 1e-4
    recover_seqlen: int = 0
    recover_train: str = "all"
    recover_lora_rank: int = 16
    recover_checkpoint: bool = False

    def check_recovery(self) -> None:
        """Refuse bad recovery settings when the recipe is read."""
        self._distill()

    def _distill(self) -> Distill:
        return Distill(steps=self.recover_steps, lr=self.recover_lr, seqlen=self.recover_seqlen, train=self.recover_train,
                       lora_rank=self.recover_lora_rank, lora_alpha=2.0 * self.recover_lora_rank, checkpoint=self.recover_checkpoint)  # fmt: skip

    def teacher(self, model: nn.Module, changed: bool = True) -> nn.Module | None:
        """A frozen copy of ``model`` before the stage changes it (None: no recovery to run)."""
        return teacher_copy(model, self.recover_steps if changed else 0)

    def recover(self, model: nn.Module, teacher: nn.Module | None, data: torch.Tensor, batch_size: int) -> dict | None:
        """Distil ``model`` towards ``teacher`` with these settings (None when there is no teacher)."""
        if teacher is None:
            return None
        return distill(model, teacher, data, dataclasses.replace(self._distill(), batch_size=batch_size))


def teacher_copy(model: nn.Module, steps: int) -> nn.Module | None:
    """A frozen copy of ``model`` to distill from after it is pruned (None when ``steps`` is 0)."""
    if not steps:
        return None
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


_ORIGINAL: ContextVar[nn.Module | None] = ContextVar("llmpress_original_model", default=None)


@contextmanager
def original_model(model: nn.Module | None) -> Iterator[None]:
    """Within it, a ``distill`` stage distils towards ``model`` (a frozen copy of the model
    as :func:`llmpress.api.compress` received it)."""
    token = _ORIGINAL.set(model)
    try:
        yield
    finally:
        _ORIGINAL.reset(token)


def current_original() -> nn.Module | None:
    """The teacher :func:`original_model` set (None outside it)."""
    return _ORIGINAL.get()
